"""`python -m checkpoint ...` runs `elastic-ckpt ...`."""

import sys

from checkpoint.cli import main

sys.exit(main())
