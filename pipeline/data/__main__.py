"""`python -m pipeline.data SOURCE ...`: the converter CLI."""

import sys

from pipeline.data.cli import main

sys.exit(main())
