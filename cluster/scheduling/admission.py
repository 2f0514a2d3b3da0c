"""Which waiting rows a step admits: the prefill budget and the KV reservation. Pure: no I/O.

A step admits rows from the head of the queue while the batch has room (`max_rows`), while their
prompt tokens fit the step's prefill budget (at least one row a step, so a long prompt is not
starved), and, with a target KV budget, while the most KV each could ever hold (prompt +
max_new_tokens + a block) fits beside the running rows' most: an admitted row is then never
refused later, and the worker never passes its budget. A row that could never fit is refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from cluster.scheduling.rows import Row
from workers.errors import KVBudgetExceeded


def kv_need(row: Row, max_draft_tokens: int) -> int:
    """The most KV tokens the row can ever hold on a worker."""
    stop = row.rounds.stop
    block = max_draft_tokens + 1
    most = len(row.rounds.prompt_ids) + stop.max_new_tokens + block
    return min(most, stop.max_context + block)


@dataclass
class Admissions:
    admit: list[Row] = field(default_factory=list)
    refuse: list[tuple[Row, KVBudgetExceeded]] = field(default_factory=list)


def plan_admissions(
    waiting: deque[Row],
    running: Sequence[Row],
    *,
    max_rows: int,
    prefill_tokens: int,
    kv_budget: int,
    max_draft_tokens: int,
) -> Admissions:
    """Take the rows to admit (and those to refuse) off the head of `waiting`."""
    out = Admissions()
    budget = prefill_tokens
    kv_free = kv_budget - sum(kv_need(r, max_draft_tokens) for r in running) if kv_budget else 0
    while waiting and len(running) + len(out.admit) < max_rows:
        row = waiting[0]
        cost = row.rounds.committed_len
        if out.admit and cost > budget:
            break
        if kv_budget:
            need = kv_need(row, max_draft_tokens)
            if need > kv_budget:  # can never fit
                waiting.popleft()
                out.refuse.append(
                    (
                        row,
                        KVBudgetExceeded(
                            f"the request may need {need} KV tokens, the target's budget is "
                            f"{kv_budget}: ask for fewer new tokens or a shorter prompt"
                        ),
                    )
                )
                continue
            if need > kv_free:
                break  # waits for running rows to finish
            kv_free -= need
        out.admit.append(waiting.popleft())
        budget -= cost
    return out
