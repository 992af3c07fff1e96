"""`python -m elastic ...` runs `elastic-run ...`."""

import sys

from elastic.launcher.cli import main

sys.exit(main())
