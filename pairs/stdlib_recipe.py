"""The seeded recipe that trains the shipped draft/target pair on the stdlib's Python sources.

    specdec train-pair --out DIR [--smoke]        (python -m pairs.stdlib_recipe)

Phases (each stops by wall clock): tokenizer -> target LM -> target greedy trajectories ->
draft distillation. Checkpoints are written periodically, so a run cut short leaves a pair.
"""

from __future__ import annotations

import os

# Under CPU contention (a shared 2-core box) OpenMP's default spin-waiting made training ~7x
# slower than passive waiting, measured. Only effective before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

from pairs import corpus  # noqa: E402
from pairs.run_log import Log  # noqa: E402
from pairs.stdlib_models import (  # noqa: E402
    DRAFT_SHAPE,
    SMOKE_DRAFT_SHAPE,
    SMOKE_TARGET_SHAPE,
    TARGET_SHAPE,
    draft_from_target,
    fp16_rounded,
    n_params,
    new_model,
    save_half,
)
from pairs.token_stream import StreamSampler, encode_docs, fixed_windows  # noqa: E402
from pairs.tokenizer import train_tokenizer  # noqa: E402
from pairs.train import distill, eval_loss, train_lm  # noqa: E402
from pairs.trajectories import generate_trajectories  # noqa: E402


@dataclass(slots=True)
class RecipeConfig:
    seed: int = 0
    threads: int = 2
    vocab_size: int = 4096
    heldout_frac: float = 0.06
    seq_len: int = 256
    target_batch: int = 8
    target_lr: float = 1.5e-3
    continue_lr: float = 6e-4
    target_minutes: float = 38.0
    gen_minutes: float = 9.0
    gen_batch: int = 96
    prompt_len: int = 96
    new_tokens: int = 80
    draft_minutes: float = 17.0
    draft_lr: float = 1e-3
    traj_batch: int = 16
    kl_batch: int = 4
    kl_weight: float = 0.5
    ckpt_minutes: float = 5.0
    smoke: bool = False
    max_files: int | None = None

    def __post_init__(self) -> None:
        if self.heldout_frac < 0.05:
            raise ValueError("hold out at least 5% of the files")


def smoke_config(seed: int = 0) -> RecipeConfig:
    """About a minute on 2 cores: a few files, tiny models. Used by the tests, never shipped."""
    return RecipeConfig(
        seed=seed,
        vocab_size=512,
        heldout_frac=0.2,
        seq_len=64,
        target_batch=8,
        target_lr=3e-3,
        target_minutes=0.15,
        gen_minutes=0.1,
        gen_batch=16,
        prompt_len=24,
        new_tokens=16,
        draft_minutes=0.1,
        draft_lr=3e-3,
        traj_batch=8,
        kl_batch=2,
        ckpt_minutes=10.0,
        smoke=True,
        max_files=12,
    )


def _pick_files(cfg: RecipeConfig, root: Path) -> list[str]:
    files = corpus.list_stdlib_files(root)
    if cfg.max_files is None:
        return files
    # Smoke corpus: a few small, seeded files, so tokenizing and training take seconds.
    small = [f for f in files if 2_000 < (root / f).stat().st_size < 30_000]
    random.Random(cfg.seed).shuffle(small)
    return sorted(small[: cfg.max_files])


def train_pair(
    out_dir: str | Path,
    cfg: RecipeConfig | None = None,
    *,
    smoke: bool = False,
    target_mode: str = "train",
    **overrides: object,
) -> dict:
    """Train the pair into out_dir/{target,draft}, with split.json and train_log.json.

    cfg defaults to the real recipe, or to smoke_config() with smoke=True; overrides set
    RecipeConfig fields by name (e.g. target_minutes=20, seed=1).
    target_mode: "train" a fresh target; "reuse" the one in out_dir (redo trajectories and
    draft only); "continue" training it for cfg.target_minutes at cfg.continue_lr (used when a
    run was starved of CPU; the log records every phase).
    """
    if target_mode not in ("train", "reuse", "continue"):
        raise ValueError(f"unknown target_mode {target_mode!r}")
    reuse_target = target_mode != "train"
    cfg = cfg or (smoke_config() if smoke else RecipeConfig())
    for name, value in overrides.items():
        if not hasattr(cfg, name):
            raise TypeError(f"unknown recipe setting {name!r}")
        setattr(cfg, name, value)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log = Log()
    summary: dict = {"config": asdict(cfg), "torch": torch.__version__, "python": sys.version}

    root = corpus.stdlib_root()
    if reuse_target and (out / "split.json").is_file():
        split = corpus.Split.load(out / "split.json", root)
    else:
        split = corpus.make_split(_pick_files(cfg, root), root, cfg.heldout_frac, cfg.seed)
        split.save(out / "split.json")
    train_texts = [t for f in split.train if (t := corpus.read_text(root, f))]
    held_texts = [t for f in split.heldout if (t := corpus.read_text(root, f))]
    summary["corpus"] = {
        "root": str(root),
        "train_files": len(split.train),
        "heldout_files": len(split.heldout),
        "train_chars": sum(map(len, train_texts)),
    }
    log({"phase": "corpus", **summary["corpus"]})

    target_dir, draft_dir = out / "target", out / "draft"
    if reuse_target and (target_dir / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(target_dir)
        target = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
        log({"phase": "target", "reused": str(target_dir)})
    else:
        t = time.monotonic()
        tok = train_tokenizer(train_texts, cfg.vocab_size)
        summary["tokenizer_minutes"] = round((time.monotonic() - t) / 60, 2)
        target = None
    t = time.monotonic()
    train_stream = encode_docs(tok, train_texts)
    held_stream = encode_docs(tok, held_texts)
    summary["tokens"] = {
        "train": len(train_stream),
        "heldout": len(held_stream),
        "encode_minutes": round((time.monotonic() - t) / 60, 2),
    }
    log({"phase": "tokens", **summary["tokens"]})
    val = fixed_windows(
        held_stream, min(cfg.seq_len, len(held_stream) - 2), 4 if cfg.smoke else 32, cfg.seed + 1
    )

    if target is None or target_mode == "continue":
        fresh = target is None
        if fresh:
            target = new_model(SMOKE_TARGET_SHAPE if cfg.smoke else TARGET_SHAPE, tok, cfg.seed)
        log({"phase": "target", "params": n_params(target), "fresh": fresh})
        # A continuation draws different windows than the first run (seed offset).
        seed = cfg.seed if fresh else cfg.seed + 100
        sampler = StreamSampler(train_stream, cfg.seq_len, cfg.target_batch, seed)
        res = train_lm(
            target,
            sampler,
            minutes=cfg.target_minutes,
            lr=cfg.target_lr if fresh else cfg.continue_lr,
            warmup=20 if cfg.smoke else (100 if fresh else 20),
            val=val,
            log=log,
            checkpoint=lambda: save_half(target, tok, target_dir),
            ckpt_minutes=cfg.ckpt_minutes,
        )
        save_half(target, tok, target_dir)
        summary["target" if fresh else "target_continued"] = res
        log({"phase": "target_done", **res})
    # Everything downstream sees the target exactly as the shipped fp16 checkpoint loads.
    teacher = fp16_rounded(target)
    summary["target_params"] = n_params(teacher)

    prompts = [p for text in train_texts for p in corpus.function_prompts(text, 1500)]
    random.Random(cfg.seed).shuffle(prompts)
    t = time.monotonic()
    traj = generate_trajectories(
        teacher,
        tok,
        prompts,
        prompt_len=cfg.prompt_len,
        new_tokens=cfg.new_tokens,
        batch=cfg.gen_batch,
        minutes=cfg.gen_minutes,
        log=log,
    )
    if len(traj) == 0:
        raise RuntimeError("no trajectories: corpus prompts too short for prompt_len")
    summary["trajectories"] = {
        "n": len(traj),
        "prompts_available": len(prompts),
        "minutes": round((time.monotonic() - t) / 60, 2),
    }
    (out / "work").mkdir(exist_ok=True)
    torch.save(traj, out / "work" / "trajectories.pt")

    draft = draft_from_target(
        target, SMOKE_DRAFT_SHAPE if cfg.smoke else DRAFT_SHAPE, tok, cfg.seed + 2
    )
    summary["draft_params"] = n_params(draft)
    summary["draft_init_val_loss"] = eval_loss(draft, val)
    log(
        {
            "phase": "draft",
            "params": summary["draft_params"],
            "init_val_loss": summary["draft_init_val_loss"],
        }
    )
    kl_sampler = StreamSampler(train_stream, cfg.seq_len, cfg.kl_batch, cfg.seed + 3)
    res = distill(
        draft,
        teacher,
        traj,
        cfg.prompt_len,
        kl_sampler,
        minutes=cfg.draft_minutes,
        lr=cfg.draft_lr,
        warmup=10 if cfg.smoke else 50,
        traj_batch=cfg.traj_batch,
        kl_weight=cfg.kl_weight,
        seed=cfg.seed + 4,
        log=log,
        checkpoint=lambda: save_half(draft, tok, draft_dir),
        ckpt_minutes=cfg.ckpt_minutes,
    )
    save_half(draft, tok, draft_dir)
    summary["draft"] = res
    summary["val_loss"] = {
        "target": eval_loss(teacher, val),
        "draft": eval_loss(fp16_rounded(draft), val),
    }
    summary["total_minutes"] = round((time.monotonic() - log.t0) / 60, 2)
    log({"phase": "done", "val_loss": summary["val_loss"], "minutes": summary["total_minutes"]})
    summary["events"] = [e for e in log.events if e.get("phase") != "trajectories"]
    log_path = out / "train_log.json"
    if target_mode != "train" and log_path.is_file():
        # Keep the history: the shipped pair's log must show every phase that produced it.
        old = json.loads(log_path.read_text())
        summary["previous_runs"] = [old, *old.pop("previous_runs", [])]
    log_path.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="one-minute run on a tiny corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-minutes", type=float)
    ap.add_argument("--gen-minutes", type=float)
    ap.add_argument("--draft-minutes", type=float)
    ap.add_argument(
        "--target-mode",
        choices=("train", "reuse", "continue"),
        default="train",
        help="reuse: keep OUT/target and split.json, redo trajectories and draft; "
        "continue: also train OUT/target further for --target-minutes",
    )
    ap.add_argument("--continue-lr", type=float)
    args = ap.parse_args(argv)
    cfg = smoke_config(args.seed) if args.smoke else RecipeConfig(seed=args.seed)
    cfg.threads = args.threads
    for name in ("target_minutes", "gen_minutes", "draft_minutes", "continue_lr"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    train_pair(args.out, cfg, target_mode=args.target_mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
