"""`python -m cli`: the `tia2` command."""

import sys

from cli.main import main

sys.exit(main())
