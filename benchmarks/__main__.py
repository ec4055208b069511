"""python3 -m benchmarks: see cli.py for the flags, or python3 -m benchmarks --help."""

import sys

from .cli import main

sys.exit(main())
