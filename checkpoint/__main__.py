"""`python -m checkpoint ...` runs `elastic-ckpt ...`."""

import sys

from checkpoint.cli.commands import main

sys.exit(main())
