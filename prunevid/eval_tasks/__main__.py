"""`python -m prunevid.eval_tasks` prints the folder for lmms-eval's `--include_path`."""

import sys

from . import main

sys.exit(main())
