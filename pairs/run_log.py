"""The recipes' progress log: JSON lines on stdout (for a nohup log), kept for train_log.json."""

from __future__ import annotations

import json
import time


class Log:
    """Prints each event as a JSON line stamped with the minutes since the start; keeps them."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        event = {"t_min": round((time.monotonic() - self.t0) / 60, 2), **event}
        self.events.append(event)
        print(json.dumps(event), flush=True)
