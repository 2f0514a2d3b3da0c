"""The policy every bench's router and engine runs with: the shipped one, less the index of recent
outputs. A bench sends the same prompts to every system and mode, so that index would hold the
very answer a later system is asked for, and measure a cache, not drafting (`--workload` notes in
docs/benchmarks.md). Lookup on a row's own prompt and output stays on."""

from __future__ import annotations

from dataclasses import replace

from cluster.scheduling.policy import PolicyConfig


def bench_policy(base: PolicyConfig | None = None) -> PolicyConfig:
    base = base or PolicyConfig()
    return replace(base, lookup=replace(base.lookup, recent_tokens=0))
