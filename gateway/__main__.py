"""`python -m tidegate.gateway ...` runs the same command line as the `tidegate` script."""

import sys

from tidegate.gateway.cli import main

sys.exit(main())
