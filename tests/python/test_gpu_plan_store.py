"""Plans stored by one process and loaded by the next (csrc/plan_cache.h), on the GPU: a second
process loads the forward and backward plans instead of building them and gets bitwise-equal
results; a corrupted store is rebuilt, never a crash or a wrong result; `off` stores nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

# One forward + backward of a softcap + causal window (a derived bprop, a band mask) at lengths
# that fill no tile; prints the plan counters and saves out and the gradients (deterministic: the
# same plan gives the same bits).
SCRIPT = r"""
import json, sys, torch, cudnn_flex
from cudnn_flex import mods
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 4, 129, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3))
out = cudnn_flex.flex_attention(q, k, v, mods.softcap(20.0), mask_mod=mods.sliding_window(50), deterministic=True)
out.float().sum().backward()
torch.save([t.detach().cpu() for t in (out, q.grad, k.grad, v.grad)], sys.argv[1])
print(json.dumps({k: v for k, v in cudnn_flex.cache_stats().items() if k.startswith("plan_")}))
"""


def run(tmp_path, name, store):
    env = dict(os.environ, CUDNN_FLEX_CACHE_DIR=str(store))
    result = tmp_path / f"{name}.pt"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(result)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(result)


def assert_bitwise_equal(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_a_new_process_loads_the_stored_plans_and_gets_the_same_bits(tmp_path):
    store = tmp_path / "plans"
    first, want = run(tmp_path, "first", store)
    assert first == {"plan_loads": 0, "plan_stores": 2, "plan_rejected": 0}
    assert (store.stat().st_mode & 0o777) == 0o700
    second, got = run(tmp_path, "second", store)
    assert second == {"plan_loads": 2, "plan_stores": 0, "plan_rejected": 0}
    assert_bitwise_equal(got, want)


def test_a_corrupted_store_is_rebuilt(tmp_path):
    store = tmp_path / "plans"
    _, want = run(tmp_path, "first", store)
    for plan in store.iterdir():
        data = plan.read_bytes()
        plan.write_bytes(data[: len(data) // 2])  # truncated, as by a crash mid-write elsewhere
    stats, got = run(tmp_path, "after", store)
    assert stats["plan_loads"] == 0 and stats["plan_stores"] == 2
    assert_bitwise_equal(got, want)


def test_off_stores_nothing(tmp_path):
    stats, _ = run(tmp_path, "off", "off")
    assert stats == {"plan_loads": 0, "plan_stores": 0, "plan_rejected": 0}


# The call check_valid_call_works makes in test_gpu_robustness: causal (a band, no other op) at
# B=2, H=4, S=128. A loaded plan's result is checked against the formula, not against the process
# that stored it: a plan can be right where it was built and wrong where it is loaded.
CHECKED_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import json, cudnn_flex
from gpu_cases import check, compare, make_inputs
from mod_cases import READY_MODS
q, k, v = make_inputs(seed=99)
kwargs, formula = READY_MODS["dsl_causal"](*q.shape[:3], k.shape[2])
got, want = compare(q, k, v, formula, **kwargs)
stats = {k: v for k, v in cudnn_flex.cache_stats().items() if k.startswith("plan_")}
check(got, want, label=json.dumps(stats))
print(json.dumps(stats))
"""


def test_plans_loaded_by_another_process_match_the_formula(tmp_path):
    env = dict(os.environ, CUDNN_FLEX_CACHE_DIR=str(tmp_path / "plans"))
    here = os.path.dirname(__file__)
    stats = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CHECKED_SCRIPT, here], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        stats.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert stats == [{"plan_loads": 0, "plan_stores": 2, "plan_rejected": 0},
                     {"plan_loads": 2, "plan_stores": 0, "plan_rejected": 0}]
