"""`python -m cifarlab.cli`: the `cifarlab` command."""

import sys

from cifarlab.cli import main

sys.exit(main())
