"""`python -m hypermoe ...`: the same as the `hypermoe` command (scripts/experiment.py runs a checkout's code so)."""

import sys

from hypermoe.cli import main

sys.exit(main())
