"""The weights' dtype of a worker: `models.dtype` by name, with `auto` resolved on the worker.

`auto` is bfloat16 where the device computes it natively and float32 elsewhere: bf16 halves the
bytes every decode step reads (a small model's step is bound by reading its weights), but where
the hardware only emulates it, it is slower than fp32. It is resolved where the model loads,
because the device is the worker's, not the machine that wrote the config.
"""

from __future__ import annotations

import torch

# The names `models.dtype` accepts (cluster/config.py spells the same list without torch).
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def native_bf16(device: str | torch.device) -> bool:
    """Whether the device computes bfloat16 natively: CUDA with bf16 (compute capability 8.0
    and up), or an x86 CPU with avx512_bf16 or AMX (torch's cpuinfo, as its oneDNN kernels use)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        cpu = torch.cpu
        return any(
            getattr(cpu, probe, lambda: False)()  # absent in older torch: not known, so no
            for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return False


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype for a `models.dtype` value on this device (a torch.dtype passes through)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling of `models.dtype` and of the status."""
    return str(dtype).removeprefix("torch.")
