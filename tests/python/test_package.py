"""The package's own entry points: versions(), `python -m cudnn_flex`, the graph cache controls."""

import importlib.metadata
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods

PACKAGE_PARENT = os.path.dirname(os.path.dirname(cudnn_flex.__file__))


def test_versions_are_integers_of_the_cudnn_in_use():
    versions = cudnn_flex.versions()
    assert set(versions) == {"cudnn_runtime", "cudnn_headers", "cudnn_frontend"}
    assert all(type(v) is int and v > 0 for v in versions.values()), versions
    # The extension runs on the cuDNN torch loaded, and was built against headers of that major version.
    assert versions["cudnn_runtime"] == torch.backends.cudnn.version()
    assert versions["cudnn_headers"] // 10000 == versions["cudnn_runtime"] // 10000
    try:
        frontend = importlib.metadata.version("nvidia-cudnn-frontend")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the frontend was not installed from its wheel")
    major, minor, patch = (int(x) for x in frontend.split(".")[:3])
    assert versions["cudnn_frontend"] == major * 10000 + minor * 100 + patch


def _python_m(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "cudnn_flex", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_python_m_cudnn_flex_runs_the_demo():
    result = _python_m("demo")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    gpu = torch.cuda.is_available()
    assert lines[0].startswith("cudnn-flex demo: " + ("CUDA GPU found" if gpu else "no CUDA GPU, running the "
                                                                                    "PyTorch reference path"))
    header = next(i for i, line in enumerate(lines) if line.startswith("score_mod "))
    assert re.split(r"\s{2,}", lines[header].strip())[:3] == ["score_mod", "path", "fwd+bwd ms"]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[header + 1:] if line.strip()]
    assert [r[0] for r in rows] == ["no score_mod", "causal", "softcap 20 (with bprop)", "relative bias q-kv", "ALiBi"]
    for row in rows:
        assert row[1] == ("cuDNN" if gpu else "reference (CPU)")
        assert float(row[2]) > 0
        if gpu:  # max |out err| and max |grad err| / max |grad| against the float32 reference
            assert len(row) == 5 and all(math.isfinite(float(x)) for x in row[3:]), row


def test_python_m_cudnn_flex_refuses_other_arguments():
    result = _python_m("--bench")
    assert result.returncode == 1
    assert "usage: python -m cudnn_flex [demo]" in result.stderr
    assert result.stdout == ""


def _plus_one(graph, score, tensors):  # module level: keyed, so its graphs are cacheable
    return graph.add(score, 1.0)


def test_clear_cache_zeroes_the_counters_and_keeps_the_capacity():
    q = torch.randn(1, 2, 8, 16)
    cudnn_flex.clear_cache()
    before = cudnn_flex.cache_stats()
    assert {k: v for k, v in before.items() if k != "capacity"} == dict(
        hits=0, misses=0, builds=0, evictions=0, size=0, plan_loads=0, plan_stores=0, plan_rejected=0)
    cudnn_flex.validate_graphs(q, q, q, _plus_one)
    cudnn_flex.validate_graphs(q, q, q, dsl_mods.causal)
    built = cudnn_flex.cache_stats()
    assert built["builds"] == 4 and built["misses"] == 4  # forward and backward graph of each
    cudnn_flex.clear_cache()
    assert cudnn_flex.cache_stats() == before
