"""`python -m bench`: the whole bench (bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
