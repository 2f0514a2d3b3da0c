"""`python -m cluster.cli ...` = `specdec ...`."""

import sys

from cluster.cli import main

sys.exit(main())
