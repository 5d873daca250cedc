"""`python -m frostline ...` runs the command line (and `torchrun -m frostline ...` one process of it)."""

import sys

from frostline.cli.main import main

sys.exit(main())
