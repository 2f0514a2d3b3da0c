"""How many cases the fuzz tests run: a few hundred in every run, any number on demand.

SPECDEC_FUZZ_EXAMPLES=10000 pytest -q tests/cluster/test_grpc_ingress.py -k fuzzed
"""

from __future__ import annotations

import os

FUZZ_EXAMPLES = int(os.environ.get("SPECDEC_FUZZ_EXAMPLES", "0"))  # 0: each test's own count
