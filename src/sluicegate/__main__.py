"""Run the `sluicegate` command with `python -m sluicegate`."""

import sys

from sluicegate.cli import main

sys.exit(main())
