"""`python -m livemig`: the `livemig` command, for a host where only the package is installed
(no console script on PATH) and for running it from a checkout."""

import sys

from .cli import main

sys.exit(main())
