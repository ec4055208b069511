"""The old entry point, kept so that recorded commands (docs/benchmarks.md) still run:
`python3 benchmarks/bench.py ARGS` is `python3 -m benchmarks ARGS` (see benchmarks/__init__.py)."""

import os
import sys

# Run as a script, this folder is sys.path[0]; the package needs the repo root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.cli import main  # noqa: E402

sys.exit(main())
