"""`python -m armt ...` is `armt ...`."""

import sys

from armt.cli import main

sys.exit(main())
