"""``python -m pruneapp``."""

import sys

from pruneapp.cli import main

sys.exit(main())
