"""`python -m sluicegate.bench`: the benchmark."""

import sys

from sluicegate.bench import main

sys.exit(main())
