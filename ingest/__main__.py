"""Allow ``python -m ingest``."""

import sys

from ingest.cli import main

sys.exit(main())
