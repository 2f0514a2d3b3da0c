"""The seeded recipe that trains the SmolLM2 feature head (workers/checkpoints/feature_head.py).

    specdec train-feature-head --out DIR [--smoke] [--gen-minutes M] [--train-minutes M]

Phases, each bounded by wall clock and resumable (rerun the same command after a crash):
1. prompts split by file as the model draft's recipe splits them (held-out files never train);
2. the target's greedy answers, decoded in bfloat16 (the dtype it serves in here), and with
   them, from one teacher-forced pass, its last-layer features at every position (DIR/work/gen*);
3. teacher-forced features over plain text (the training side of the split and installed
   packages' sources; DIR/work/corpus): ~10x the tokens per minute of generation;
4. the head (EAGLE-1's losses): at each position, feature regression (smooth L1 to the target's
   next feature, in units of the features' RMS) plus 0.1 x soft cross-entropy of the head's
   scores against the target's own scores of the true next feature, over the head's
   vocabulary (the shipped model draft's 8,192 words). Inputs get a little noise, as EAGLE's,
   so the head tolerates its own fed-back features. DIR/head is written when held-out
   agreement improves; DIR/work/state.pt holds the run (resume).
5. the evaluation (pairs.feature_eval): teacher-forced agreement and online per-position
   acceptance of 4-token chains, beside the shipped model draft's on the same positions.
Progress goes to stdout as JSON lines.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pairs import corpus, corpus_labels, instruct_prompts  # noqa: E402
from pairs.answer_labels import generate_shards  # noqa: E402
from pairs.run_log import Log  # noqa: E402
from pairs.train import lr_at  # noqa: E402
from workers.checkpoints import smollm2  # noqa: E402
from workers.checkpoints.feature_head import FeatureHead  # noqa: E402
from workers.checkpoints.registry import SMOLLM2_DRAFT_DIR  # noqa: E402
from workers.checkpoints.subset_draft import read_tensor  # noqa: E402


@dataclass(slots=True)
class Config:
    seed: int = 0
    threads: int = 2
    heldout_frac: float = 0.06
    max_prompt_tokens: int = 256
    chat_new_tokens: int = 128
    code_new_tokens: int = 64
    gen_batch: int = 32
    gen_minutes: float = 20.0
    heldout_batches: int = 2
    corpus_tokens: int = 600_000
    corpus_minutes: float = 6.0
    corpus_len: int = 256
    feature_batch: int = 16
    package_files: int = 3000
    corpus_frac: float = 0.4  # of each training batch's rows
    train_minutes: float = 35.0
    train_batch: int = 8
    window: int = 320  # tokens of a record a training row sees (a random crop)
    lr: float = 5e-4
    cls_weight: float = 0.1
    noise: float = 0.05  # input feature noise, relative to the features' RMS
    # Training-time test (EAGLE-3's idea, simplified): a second pass reads the first pass's own
    # predicted features in place of the target's, as drafting past the first token does.
    ttt: bool = True
    ckpt_minutes: float = 4.0
    smoke: bool = False


def smoke_config() -> Config:
    return Config(
        gen_batch=4,
        chat_new_tokens=8,
        code_new_tokens=8,
        gen_minutes=0.3,
        heldout_batches=1,
        corpus_tokens=2048,
        corpus_minutes=0.3,
        corpus_len=64,
        package_files=20,
        train_minutes=0.3,
        train_batch=2,
        window=64,
        ckpt_minutes=0.1,
        smoke=True,
    )


def last_layer_features(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The last decoder layer's output (before the final norm) at every position [B, T, d]."""
    got: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        got.append(out[0] if isinstance(out, tuple) else out)

    handle = model.model.layers[-1].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model.model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    return got[0]


def add_features(model, records: list[dict], batch: int) -> None:
    """Each record gets `feats` [len, d] (bfloat16): right-padded teacher-forced passes."""
    for i in range(0, len(records), batch):
        recs = records[i : i + batch]
        width = max(len(r["ids"]) for r in recs)
        ids = torch.zeros(len(recs), width, dtype=torch.long)
        mask = torch.zeros(len(recs), width, dtype=torch.long)
        for j, r in enumerate(recs):
            ids[j, : len(r["ids"])] = r["ids"].long()
            mask[j, : len(r["ids"])] = 1
        feats = last_layer_features(model, ids, mask)
        for j, r in enumerate(recs):
            r["feats"] = feats[j, : len(r["ids"])].to(torch.bfloat16).clone()


def featured_shards(model, gen_dir: Path, batch: int, log: Log) -> list[dict]:
    """Generation shards with features (computed once per shard, kept beside it)."""
    recs: list[dict] = []
    for path in sorted(gen_dir.glob("shard_*.pt")):
        fpath = path.with_name(path.name.replace("shard_", "feat_"))
        if fpath.is_file():
            feats = torch.load(fpath, weights_only=False)
            shard = torch.load(path, weights_only=False)
            for r, f in zip(shard, feats, strict=True):
                r["feats"] = f
        else:
            shard = torch.load(path, weights_only=False)
            add_features(model, shard, batch)
            torch.save([r["feats"] for r in shard], fpath)
        recs += shard
    log({"phase": "features", "dir": gen_dir.name, "records": len(recs)})
    return recs


def corpus_records(model, tok, train_files: list[str], cfg: Config, out: Path, log: Log):
    """Teacher-forced features over plain text, in shards of feature_batch chunks (resume)."""
    out.mkdir(parents=True, exist_ok=True)
    have = sorted(out.glob("corpus_*.pt"))
    recs: list[dict] = [r for p in have for r in torch.load(p, weights_only=False)]
    tokens = sum(len(r["ids"]) for r in recs)
    t0 = time.monotonic()
    texts = corpus_labels.training_texts(train_files, cfg.package_files, cfg.seed)
    rows: list[list[int]] = []
    skip = len(recs)
    for chunk in corpus_labels.chunks(tok, texts, cfg.corpus_len):
        if skip:  # chunks already featured in an earlier run
            skip -= 1
            continue
        if tokens >= cfg.corpus_tokens or time.monotonic() - t0 > cfg.corpus_minutes * 60:
            break
        rows.append(chunk)
        if len(rows) == cfg.feature_batch:
            shard = [{"ids": torch.tensor(r, dtype=torch.int32), "prompt_len": 1} for r in rows]
            add_features(model, shard, cfg.feature_batch)
            torch.save(shard, out / f"corpus_{len(have):05d}.pt")
            have.append(out / f"corpus_{len(have):05d}.pt")
            recs += shard
            tokens += sum(len(r) for r in rows)
            rows = []
            log({"phase": "corpus", "tokens": tokens})
    return recs


def training_batch(
    records: list[dict], rows: list[int], window: int, gen: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """(ids x[t+1], features f[t], target features f[t+1], positions, valid) for a batch, each
    row a random window of its record, right-padded."""
    crops = []
    for i in rows:
        r = records[i]
        n = len(r["ids"])
        lo = int(torch.randint(0, max(1, n - window) + 1, (1,), generator=gen)) if n > window else 0
        crops.append((r["ids"][lo : lo + window].long(), r["feats"][lo : lo + window], lo))
    width = max(len(c[0]) for c in crops) - 1
    d = crops[0][1].shape[-1]
    ids = torch.zeros(len(crops), width, dtype=torch.long)
    f_in = torch.zeros(len(crops), width, d)
    f_out = torch.zeros(len(crops), width, d)
    pos = torch.zeros(len(crops), width, dtype=torch.long)
    valid = torch.zeros(len(crops), width, dtype=torch.bool)
    for j, (tok, feat, lo) in enumerate(crops):
        m = len(tok) - 1
        ids[j, :m] = tok[1:]
        f_in[j, :m] = feat[:-1].float()
        f_out[j, :m] = feat[1:].float()
        pos[j, :m] = torch.arange(lo + 1, lo + 1 + m)
        valid[j, :m] = True
    return ids, f_in, f_out, pos, valid


def head_losses(head: FeatureHead, batch, scale: float, noise: float, gen=None, ttt: bool = False):
    """(regression loss, soft cross-entropy, argmax agreement) on the valid positions; with
    `ttt`, the sums of two passes, the second reading the first's predicted features (each
    position's input feature is the head's guess of it: what it reads from the second draft
    token on), and the agreement of the second."""
    ids, f_in, f_out, pos, valid = batch
    if noise > 0:
        f_in = f_in + torch.randn(f_in.shape, generator=gen) * (noise * scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = head(ids, f_in, pos)
    reg, cls, agree = _pass_losses(head, pred, f_out, valid, scale)
    if not ttt:
        return reg, cls, agree
    own = torch.cat([f_in[:, :1], pred.float()[:, :-1].detach()], dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred2 = head(ids, own, pos)
    reg2, cls2, agree2 = _pass_losses(head, pred2, f_out, valid, scale)
    return reg + reg2, cls + cls2, agree2


def _pass_losses(head: FeatureHead, pred, f_out, valid, scale: float):
    pred, tgt = pred.float()[valid], f_out[valid]
    reg = F.smooth_l1_loss(pred / scale, tgt / scale)
    with torch.no_grad():
        teacher = head.logits(tgt).float()
        p = teacher.softmax(-1)
    logits = head.logits(pred).float()
    cls = -(p * logits.log_softmax(-1)).sum(-1).mean()
    agree = (logits.argmax(-1) == teacher.argmax(-1)).float().mean()
    return reg, cls, agree


@torch.no_grad()
def evaluate(head: FeatureHead, records: list[dict], scale: float, window: int) -> dict:
    """Held-out losses and agreement with the target: `agree` reading the target's features
    (the first draft token), `agree_own` reading the head's own (the later ones); `score`, their
    sum, picks the checkpoint."""
    head.eval()
    gen = torch.Generator().manual_seed(1)
    tot = {"reg": 0.0, "cls": 0.0, "agree": 0.0, "agree_own": 0.0}
    n = 0
    for i in range(0, len(records), 8):
        rows = list(range(i, min(i + 8, len(records))))
        batch = training_batch(records, rows, window, gen)
        reg, cls, agree = head_losses(head, batch, scale, 0)
        _, _, own = head_losses(head, batch, scale, 0, ttt=True)
        for k, v in zip(tot, (reg, cls, agree, own), strict=True):
            tot[k] += v.item() * len(rows)
        n += len(rows)
    head.train()
    out = {k: round(v / max(n, 1), 4) for k, v in tot.items()}
    return {**out, "score": round(out["agree"] + out["agree_own"], 4)}


def new_head(target, cfg_head_ids: torch.Tensor) -> FeatureHead:
    """A head whose layer starts as the target's last layer and whose fusion passes the
    feature through (x = f[t] + a small embedding term), so it starts near "f' = f"."""
    head = FeatureHead(target.config, cfg_head_ids)
    head.layer.load_state_dict(target.model.layers[-1].state_dict())
    d = target.config.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, d:] = torch.eye(d)
        torch.nn.init.normal_(head.fc.weight[:, :d], std=0.02)
        head.fc.bias.zero_()
    head.borrow(target.model.embed_tokens.weight, target.model.norm.weight, target.lm_head.weight)
    return head


def run(out: Path, cfg: Config) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log = Log()
    summary: dict = {"config": asdict(cfg), "torch": torch.__version__}
    target_path = smollm2.ensure_target(log=lambda m: log({"phase": "convert", "msg": m}))
    tok = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.bfloat16).eval()
    eos = int(tok.eos_token_id)

    root = corpus.stdlib_root()
    split = corpus.make_split(corpus.list_stdlib_files(root), root, cfg.heldout_frac, cfg.seed)
    train_files = split.train[:40] if cfg.smoke else split.train
    held_files = split.heldout[:10] if cfg.smoke else split.heldout
    n = cfg.max_prompt_tokens
    train_p = instruct_prompts.encoded_prompts(tok, train_files, cfg.seed, n)
    held_p = instruct_prompts.encoded_prompts(tok, held_files, cfg.seed + 1, n)
    held_p = held_p[: cfg.heldout_batches * cfg.gen_batch * 2]
    max_new = {"chat": cfg.chat_new_tokens, "code": cfg.code_new_tokens}
    gen_kw = dict(batch=cfg.gen_batch, max_new=max_new, eos=eos, top_k=1, log=log)
    work = out / "work"
    generate_shards(target, held_p, work / "gen_heldout", minutes=1e9, **gen_kw)
    generate_shards(target, train_p, work / "gen", minutes=cfg.gen_minutes, **gen_kw)
    held = featured_shards(target, work / "gen_heldout", cfg.feature_batch, log)
    train = featured_shards(target, work / "gen", cfg.feature_batch, log)
    corp = corpus_records(target, tok, train_files, cfg, work / "corpus", log)
    summary["data"] = {
        "gen_records": len(train),
        "gen_tokens": sum(len(r["ids"]) for r in train),
        "corpus_tokens": sum(len(r["ids"]) for r in corp),
        "heldout_records": len(held),
    }
    log({"phase": "data", **summary["data"]})
    sample = torch.cat([r["feats"][:64].float() for r in train[:64]])
    scale = float(sample.pow(2).mean().sqrt())

    head_ids = read_tensor(SMOLLM2_DRAFT_DIR, "head_ids")  # the model draft's vocabulary
    head = new_head(target.float(), head_ids)
    del target
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    state_path = work / "state.pt"
    step, spent, best = 0, 0.0, -1.0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        head.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        step, spent = state["step"], state["spent"]
        best = state["best"] if state.get("criterion") == "score" else -1.0
        log({"phase": "resume", "step": step, "spent_min": round(spent / 60, 2)})
    summary["trainable_params"] = sum(p.numel() for p in params)
    log({"phase": "head", "trainable": summary["trainable_params"], "feature_rms": scale})
    log({"phase": "val", "step": step, **evaluate(head, held, scale, cfg.window)})
    pool = train + corp
    gen = torch.Generator().manual_seed(cfg.seed + step)
    budget = cfg.train_minutes * 60
    t_start, last_ckpt = time.monotonic() - spent, time.monotonic()
    ema = None
    head.train()

    def checkpoint() -> None:
        nonlocal best
        val = evaluate(head, held, scale, cfg.window)
        log({"phase": "val", "step": step, **val})
        if val["score"] > best:
            best = val["score"]
            head.save(out / "head", target="smollm2-135m-instruct")
        torch.save(
            {
                "model": head.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "spent": time.monotonic() - t_start,
                "best": best,
                "criterion": "score",
            },
            state_path,
        )

    while (el := time.monotonic() - t_start) < budget:
        for g in opt.param_groups:
            g["lr"] = lr_at(el / budget, step, cfg.lr, warmup=30)
        n_c = round(cfg.train_batch * cfg.corpus_frac) if corp else 0
        rows = torch.randint(0, len(train), (cfg.train_batch - n_c,), generator=gen).tolist()
        rows += (len(train) + torch.randint(0, len(corp), (n_c,), generator=gen)).tolist()
        batch = training_batch(pool, rows, cfg.window, gen)
        reg, cls, agree = head_losses(head, batch, scale, cfg.noise, gen, cfg.ttt)
        (reg + cfg.cls_weight * cls).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        v = (reg.item(), cls.item(), agree.item())
        ema = v if ema is None else tuple(0.95 * a + 0.05 * b for a, b in zip(ema, v, strict=True))
        if step % 20 == 0:
            log(
                {
                    "phase": "train",
                    "step": step,
                    "reg": round(ema[0], 4),
                    "cls": round(ema[1], 4),
                    "agree": round(ema[2], 4),
                    "min": round(el / 60, 2),
                }
            )
        if time.monotonic() - last_ckpt >= cfg.ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.monotonic()
    checkpoint()
    summary["train"] = {"steps": step, "best_agree": best}
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    log({"phase": "done", **summary["train"]})
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="a minute on a few files")
    for name in ("gen-minutes", "train-minutes", "corpus-minutes", "lr"):
        ap.add_argument(f"--{name}", type=float)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    cfg = smoke_config() if args.smoke else Config()
    for name in ("gen_minutes", "train_minutes", "corpus_minutes", "lr", "threads"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    run(args.out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
