"""The plan store as the library wires it (csrc/plan_cache.h): where it lives, how it is turned
off, and the digest of the library's code that keys every stored plan. The store's file rules
(atomic writes, corrupt and foreign files, the size bound) are gtests (tests/cpp); loading a plan
in a new process needs a GPU (test_gpu_plan_store.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cudnn_flex
from cudnn_flex import _plan_salt

PACKAGE = Path(cudnn_flex.__file__).parent


def directory_in_a_new_process(**env) -> str:
    """cudnn_flex.plan_store_directory() in a fresh interpreter with `env` (the store reads the
    environment once per process)."""
    full = {k: v for k, v in os.environ.items() if k not in ("CUDNN_FLEX_CACHE_DIR", "XDG_CACHE_HOME")}
    full.update(env)
    code = "import cudnn_flex; print(cudnn_flex.plan_store_directory())"
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_directory_follows_the_environment(tmp_path):
    assert directory_in_a_new_process(CUDNN_FLEX_CACHE_DIR=str(tmp_path / "plans")) == str(tmp_path / "plans")
    assert directory_in_a_new_process(CUDNN_FLEX_CACHE_DIR="off") == "None"


def test_by_default_the_store_is_in_the_users_cache_directory(tmp_path):
    home = str(tmp_path / "home")
    assert directory_in_a_new_process(HOME=home) == home + "/.cache/cudnn_flex"
    assert directory_in_a_new_process(HOME=home, CUDNN_FLEX_CACHE_DIR="") == home + "/.cache/cudnn_flex"
    assert directory_in_a_new_process(HOME=home, XDG_CACHE_HOME=str(tmp_path)) == str(tmp_path / "cudnn_flex")
    # Nothing is created before a plan is stored.
    assert list(tmp_path.iterdir()) == []


def test_importing_creates_no_directory(tmp_path):
    directory_in_a_new_process(CUDNN_FLEX_CACHE_DIR=str(tmp_path / "plans"))
    assert not (tmp_path / "plans").exists()


@pytest.fixture
def package_copy(tmp_path):
    copy = tmp_path / "cudnn_flex"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_code_digest_is_stable(package_copy):
    assert _plan_salt.lowering_digest(package_copy) == _plan_salt.lowering_digest(package_copy)
    assert _plan_salt.lowering_digest(package_copy) == _plan_salt.lowering_digest(PACKAGE)


def test_any_change_to_the_lowering_code_changes_the_digest(package_copy):
    before = _plan_salt.lowering_digest(package_copy)
    replay = package_copy / "program" / "replay.py"
    replay.write_text(replay.read_text().replace("_LARGEST_SAFE_FILL = -(2.0 ** 14)", "_LARGEST_SAFE_FILL = -(2.0 ** 13)"))
    assert _plan_salt.lowering_digest(package_copy) != before


def test_a_rebuilt_extension_changes_the_digest(package_copy):
    extension = next(package_copy.glob("_C*.so"))
    before = _plan_salt.lowering_digest(package_copy)
    os.utime(extension, ns=(0, extension.stat().st_mtime_ns + 1))
    assert _plan_salt.lowering_digest(package_copy) != before


def test_the_cache_counters_include_the_plan_store():
    stats = cudnn_flex.cache_stats()
    assert {"plan_loads", "plan_stores", "plan_rejected"} <= set(stats)
