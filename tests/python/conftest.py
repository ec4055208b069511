import os
import sys

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# Tests count graph builds, so plans stored on disk by an earlier run must not turn them into
# loads: the store is off unless a run asks for one (the plan store's own tests give each process
# a temporary directory).
os.environ.setdefault("CUDNN_FLEX_CACHE_DIR", "off")

# Test helpers (cases.py, gpu_cases.py, oracle.py, ...) are imported by name from this folder.
sys.path.insert(0, os.path.dirname(__file__))

# scripts/mutation_check.py runs each planted bug with this profile: the same examples in every
# run and no example database, so one bug's failing input is never replayed on another (two bugs
# run at once from the same folder) and a catcher checked without a bug sees what it sees on one.
# (Only where Hypothesis is installed: test_api_fuzz.py skips without it, the other tests need none.)
try:
    from hypothesis import settings
except ImportError:
    pass
else:
    settings.register_profile("mutation_check", derandomize=True, database=None)
