"""`models.dtype` (workers/dtypes.py): `auto` is bfloat16 exactly where the device does it
natively, float32 elsewhere; the config and the worker spell the same names; the runner resolves
a name on its own device and keeps float32 as its default."""

from __future__ import annotations

import typing

import pytest
import torch

from cluster.config import ClusterConfig, ConfigError, ModelsConfig
from tests.tiny_models import make_model
from workers.dtypes import DTYPE_NAMES, dtype_name, native_bf16, resolve_dtype
from workers.model_runner import ModelRunner


def _cpu_has(monkeypatch, *, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "want"),
    [
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
        (True, True, torch.bfloat16),
        (False, False, torch.float32),  # emulated bf16 is slower than fp32: keep fp32
    ],
)
def test_auto_on_a_cpu_is_bf16_only_where_it_is_native(monkeypatch, avx512_bf16, amx, want):
    _cpu_has(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    assert native_bf16("cpu") == (want == torch.bfloat16)
    assert resolve_dtype("auto", "cpu") == want


def test_auto_on_cuda_asks_the_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert asked == [False]  # native only: a card that emulates bf16 keeps fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_dtype("auto", "cuda:0") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", "cuda") == torch.float32  # no card visible here


def test_auto_on_other_devices_is_float32():
    assert resolve_dtype("auto", "meta") == torch.float32


def test_explicit_names_and_torch_dtypes_pass_through(monkeypatch):
    _cpu_has(monkeypatch, avx512_bf16=False, amx=False)  # a name never depends on the device
    for name in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(name, "cpu") == getattr(torch, name)
        assert dtype_name(getattr(torch, name)) == name
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        resolve_dtype("fp8", "cpu")


def test_the_config_accepts_exactly_the_workers_names_and_ships_auto():
    field = ModelsConfig.model_fields["dtype"]
    assert typing.get_args(field.annotation) == DTYPE_NAMES
    assert ClusterConfig.load(None).models.dtype == "auto"
    with pytest.raises(ConfigError, match="models.dtype"):
        ClusterConfig.load({"models": {"dtype": "fp8"}})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("dtype") / "m", seed=3)


def test_the_runner_resolves_a_name_on_its_device_and_defaults_to_float32(tiny, monkeypatch):
    assert ModelRunner(tiny).dtype == torch.float32  # exactness with HF generate by default
    assert ModelRunner(tiny, dtype="bfloat16").dtype == torch.bfloat16
    _cpu_has(monkeypatch, avx512_bf16=True, amx=False)
    runner = ModelRunner(tiny, dtype="auto")
    assert runner.dtype == torch.bfloat16
    assert next(runner.model.parameters()).dtype == torch.bfloat16
    assert runner.extend("s", [5, 6, 7]).dtype == torch.float32  # logits leave as fp32
    _cpu_has(monkeypatch, avx512_bf16=False, amx=False)
    assert ModelRunner(tiny, dtype="auto").dtype == torch.float32
