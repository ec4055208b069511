"""Robustness on a GPU: concurrent callers, memory held flat, bad input, empty and non-finite input.

Run on the GPU machine with the extension built:

    python3 -m pytest -q -m gpu -s tests/python/test_gpu_robustness.py

`-s` shows the lines starting with `ROBUSTNESS`: the figures that the issue note quotes (threads x
calls, host RSS and CUDA memory before and after). The CPU tests of the same table are in
test_api_errors.py, test_graph_validation.py, test_registry.py, test_op_schema.py and
test_api_fuzz.py; the C++ cache under ThreadSanitizer is scripts/tsan.sh.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import threading
import time
import traceback

import pytest
import torch

import cudnn_flex
import oracle
from cases import TO_BHSD
from cudnn_flex import dsl_mods, mods
from gpu_cases import LSE_ATOL, TOL, check, compare, make_inputs, on_device
from mod_cases import READY_MODS

pytestmark = pytest.mark.gpu

MiB = 1 << 20


def report(what: str, **figures) -> None:
    """One line of figures for the issue note (shown with pytest -s)."""
    print(f"\nROBUSTNESS {what}: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cuda_used_bytes() -> int:
    """Device memory in use by this process (modules, cuDNN, allocator), after the caching
    allocator returned its free blocks: NVML's figure for this pid where it has one, else the
    device's used memory, which only measures this process when no other test process runs."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    found = re.search(rf"process\s+{os.getpid()}\s+uses\s+([0-9.]+) MB", torch.cuda.list_gpu_processes())
    if found:
        return int(float(found.group(1)) * MiB)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("no per-process GPU memory (NVML) and other pytest-xdist workers share the device; "
                    "run this test without -n")
    free, total = torch.cuda.mem_get_info()
    return total - free


def settle() -> None:
    torch.cuda.synchronize()
    gc.collect()


@contextlib.contextmanager
def cache_capacity(n: int):
    old = cudnn_flex.cache_stats()["capacity"]
    cudnn_flex.set_cache_capacity(n)
    try:
        yield
    finally:
        cudnn_flex.set_cache_capacity(old)


def check_valid_call_works() -> None:
    """A fresh, valid fwd+bwd call agrees with the formula (out, lse, dq, dk, dv)."""
    q, k, v = make_inputs(seed=99)
    kwargs, formula = READY_MODS["dsl_causal"](*q.shape[:3], k.shape[2])
    check(*compare(q, k, v, formula, **kwargs), label="valid call after the test")


# --- Concurrency -----------------------------------------------------------------------------

SOFTCAP = dsl_mods.softcap(2.0)  # one stateful object shared by every thread, as a model would have it


class Spec:
    """One call: inputs, score_mod, options; forward only or forward + backward."""

    def __init__(self, name, *, b=2, h=4, h_kv=None, s_q=128, s_kv=None, d=64, dtype=torch.bfloat16,
                 layout="bhsd", mod="none", bwd=True, seed=0):
        self.name, self.layout, self.bwd = name, layout, bwd
        self.q, self.k, self.v = make_inputs(b=b, h=h, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=d, dtype=dtype,
                                             layout=layout, seed=seed)
        s_kv = s_kv or s_q
        self.kwargs = {}
        if mod == "causal":
            self.kwargs = dict(score_mod=dsl_mods.causal)
        elif mod == "softcap":
            self.kwargs = dict(score_mod=SOFTCAP.forward, score_mod_bprop=SOFTCAP.backward)
        elif mod == "alibi":
            self.kwargs = dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": mods.alibi_slopes(h, "cuda")})
        elif mod == "bias":
            g = torch.Generator(device="cuda").manual_seed(seed + 1000)
            bias = torch.randn(1, h, s_q, s_kv, device="cuda", generator=g)
            self.kwargs = dict(score_mod=dsl_mods.add_bias, score_mod_tensors={"bias": bias})
        else:
            assert mod == "none"
        g = torch.Generator(device="cuda").manual_seed(seed + 2000)
        out_shape = self.q.shape[:-1] + (self.v.shape[-1],)
        self.d_out = torch.randn(out_shape, device="cuda", generator=g).to(dtype)

    def __call__(self):
        """(out, lse[, dq, dk, dv]), all detached."""
        context = contextlib.nullcontext() if self.bwd else torch.no_grad()
        with context:
            out, lse = cudnn_flex.flex_attention(self.q, self.k, self.v, **self.kwargs, layout=self.layout,
                                                 return_lse=True, deterministic=True)
        if not self.bwd:
            return out, lse
        grads = torch.autograd.grad(out, (self.q, self.k, self.v), self.d_out)
        return (out.detach(), lse, *grads)


def concurrency_specs():
    return [
        Spec("bhsd-none-fwd", mod="none", bwd=False, seed=1),
        Spec("bhsd-causal-bwd", mod="causal", seed=2),
        Spec("bshd-causal-gqa-fwd", layout="bshd", h=8, h_kv=2, s_q=64, s_kv=192, d=128, mod="causal",
             bwd=False, seed=3),
        Spec("bshd-softcap-bwd", layout="bshd", mod="softcap", seed=4),
        Spec("sbhd-softcap-gqa-bwd", layout="sbhd", h=8, h_kv=2, s_q=96, s_kv=64, mod="softcap", seed=5),
        Spec("bhsd-alibi-mqa-bwd", h=8, h_kv=1, mod="alibi", seed=6),
        Spec("sbhd-alibi-fp16-fwd", layout="sbhd", dtype=torch.float16, mod="alibi", bwd=False, seed=7),
        Spec("bhsd-bias-bwd", b=1, s_q=64, s_kv=128, d=128, mod="bias", seed=8),
        Spec("bshd-bias-fp16-bwd", layout="bshd", dtype=torch.float16, mod="bias", seed=9),
        Spec("bhsd-none-fp16-bwd", b=1, h=2, s_q=256, dtype=torch.float16, mod="none", seed=10),
    ]


def test_eight_threads_with_mixed_calls_match_a_serial_run_and_keep_the_cache_bounded():
    threads, calls_per_thread, capacity = 8, 50, 4
    specs = concurrency_specs()
    original_capacity = cudnn_flex.cache_stats()["capacity"]
    with cache_capacity(capacity):
        # Serially, with the same small cache (so every call rebuilds its graphs): twice, to show
        # that a rebuilt graph gives bitwise the same result (the baseline is sound).
        serial = [spec() for spec in specs]
        for spec, want in zip(specs, serial):
            assert all(torch.equal(a, b) for a, b in zip(spec(), want)), \
                f"{spec.name}: a serial rebuild differs from the first serial run (not a concurrency issue)"
        torch.cuda.synchronize()

    mismatches, failures, sizes = [], [], []
    done = threading.Event()

    def worker(t):
        for i in range(calls_per_thread):
            n = (t * 7 + i * 3 + i // 5) % len(specs)
            try:
                got = specs[n]()
                for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, serial[n]):
                    if not torch.equal(a, b):
                        mismatches.append(f"thread {t} call {i} {specs[n].name} {name}: max |diff| "
                                          f"{(a.float() - b.float()).abs().max().item()}")
            except BaseException:  # noqa: BLE001  (reported below, with the call)
                failures.append(f"thread {t} call {i} {specs[n].name}:\n{traceback.format_exc()}")
            sizes.append(cudnn_flex.cache_stats()["size"])

    def monitor():
        while not done.is_set():
            s = cudnn_flex.cache_stats()
            sizes.append(s["size"])
            if s["size"] > s["capacity"]:
                failures.append(f"cache size {s['size']} above its capacity {s['capacity']}")
            time.sleep(0.001)

    with cache_capacity(capacity):
        before = cudnn_flex.cache_stats()
        start = time.perf_counter()
        pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        for th in pool:
            th.start()
        deadline = time.monotonic() + 300
        for th in pool:
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [th.name for th in pool if th.is_alive()]
        done.set()
        watcher.join(timeout=10)
        seconds = time.perf_counter() - start
        torch.cuda.synchronize()
        after = cudnn_flex.cache_stats()
    assert cudnn_flex.cache_stats()["capacity"] == original_capacity

    delta = {k: after[k] - before[k] for k in ("hits", "misses", "builds", "evictions")}
    report("concurrency", threads=threads, calls_per_thread=calls_per_thread,
           calls=threads * calls_per_thread, distinct_calls=len(specs), cache_capacity=capacity,
           max_cache_size_seen=max(sizes, default=0), seconds=f"{seconds:.1f}",
           mismatches=len(mismatches), failures=len(failures), **delta)
    assert not hung, f"threads still running after 300 s (deadlock?): {hung}"
    assert not failures, f"{len(failures)} calls failed; first ones:\n" + "\n".join(failures[:3])
    assert not mismatches, f"{len(mismatches)} results differ from the serial run:\n" + "\n".join(mismatches[:10])
    assert max(sizes) <= capacity
    assert delta["evictions"] > 0, "the test meant to evict concurrently but nothing was evicted"


# --- Memory ----------------------------------------------------------------------------------

def test_ten_thousand_cached_calls_hold_host_and_cuda_memory_flat():
    q, k, v = (t.detach() for t in make_inputs(b=1, h=2, s_q=64, d=64))
    slopes = mods.alibi_slopes(2, "cuda")
    calls = 10_000

    def call():
        return cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": slopes})

    with torch.no_grad():
        for _ in range(200):  # the first call builds; the rest warm up allocators and caches
            out = call()
        out = None
        settle()
        builds, rss0, alloc0, objects0 = (cudnn_flex.cache_stats()["builds"], rss_bytes(),
                                          torch.cuda.memory_allocated(), len(gc.get_objects()))
        start = time.perf_counter()
        for _ in range(calls):
            out = call()
        out = None
        settle()
        seconds = time.perf_counter() - start
        rss1, alloc1, objects1 = rss_bytes(), torch.cuda.memory_allocated(), len(gc.get_objects())
    report("memory cached fwd", calls=calls, rss_before_mib=f"{rss0 / MiB:.1f}", rss_after_mib=f"{rss1 / MiB:.1f}",
           rss_growth_kib=(rss1 - rss0) // 1024, cuda_allocated_before=alloc0, cuda_allocated_after=alloc1,
           python_objects_growth=objects1 - objects0, us_per_call=f"{seconds / calls * 1e6:.1f}")
    assert cudnn_flex.cache_stats()["builds"] == builds, "cached calls built a graph"
    assert alloc1 == alloc0, "CUDA memory held by cached calls grew"
    assert rss1 - rss0 < 16 * MiB, "host RSS grew by 16 MiB or more over 10,000 cached calls"
    assert objects1 - objects0 < 1000, "Python objects accumulate per call"


def test_cached_forward_and_backward_calls_hold_memory_flat():
    q, k, v = make_inputs(b=1, h=4, h_kv=2, s_q=64, d=64)
    d_out = torch.randn_like(q)
    calls = 1_000

    def call():
        out = cudnn_flex.flex_attention(q, k, v, SOFTCAP.forward, SOFTCAP.backward, deterministic=True)
        torch.autograd.grad(out, (q, k, v), d_out)

    for _ in range(20):
        call()
    settle()
    builds, rss0, alloc0 = cudnn_flex.cache_stats()["builds"], rss_bytes(), torch.cuda.memory_allocated()
    for _ in range(calls):
        call()
    settle()
    rss1, alloc1 = rss_bytes(), torch.cuda.memory_allocated()
    report("memory cached fwd+bwd", calls=calls, rss_before_mib=f"{rss0 / MiB:.1f}",
           rss_after_mib=f"{rss1 / MiB:.1f}", rss_growth_kib=(rss1 - rss0) // 1024,
           cuda_allocated_before=alloc0, cuda_allocated_after=alloc1)
    assert cudnn_flex.cache_stats()["builds"] == builds
    assert alloc1 == alloc0
    assert rss1 - rss0 < 16 * MiB


def test_evicted_graphs_release_their_memory():
    """40 distinct graphs (one per scale) through a cache of 2: memory after the first 10 builds
    stays where it is for the next 30 (no linear growth). Then, for contrast, 40 other graphs kept
    (capacity 64) and evicted at once (measured last, so that the memory they free cannot hide a
    leak in the first part)."""
    q, k, v = (t.detach() for t in make_inputs(b=1, h=2, s_q=128, d=64))

    def build(scale):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, scale=scale)

    with torch.no_grad(), cache_capacity(2):
        build(0.5)  # compiles the kernel once; later scales rebuild the same structure
        settle()
        stats0 = cudnn_flex.cache_stats()
        rss, cuda = [rss_bytes()], [cuda_used_bytes()]
        for i in range(40):
            build(0.125 + 0.001 * i)
            if i in (9, 39):
                settle()
                rss.append(rss_bytes())
                cuda.append(cuda_used_bytes())
        stats1 = cudnn_flex.cache_stats()

        # Contrast: 40 graphs kept alive, then evicted by shrinking the cache.
        base_rss, base_cuda = rss[-1], cuda[-1]
        cudnn_flex.set_cache_capacity(64)
        for i in range(40):
            build(0.25 + 0.001 * i)
        settle()
        kept_rss, kept_cuda = rss_bytes(), cuda_used_bytes()
        cudnn_flex.set_cache_capacity(2)
        settle()
        dropped_rss, dropped_cuda = rss_bytes(), cuda_used_bytes()

    rss_first10, rss_last30 = rss[1] - rss[0], rss[2] - rss[1]
    cuda_first10, cuda_last30 = cuda[1] - cuda[0], cuda[2] - cuda[1]
    report("memory eviction contrast (40 graphs kept, then evicted to 2)",
           rss_base_mib=f"{base_rss / MiB:.1f}", rss_kept_mib=f"{kept_rss / MiB:.1f}",
           rss_after_evict_mib=f"{dropped_rss / MiB:.1f}", cuda_used_base_mib=f"{base_cuda / MiB:.1f}",
           cuda_used_kept_mib=f"{kept_cuda / MiB:.1f}", cuda_used_after_evict_mib=f"{dropped_cuda / MiB:.1f}")
    report("memory eviction (capacity 2, 40 builds)", builds=stats1["builds"] - stats0["builds"],
           evictions=stats1["evictions"] - stats0["evictions"],
           rss_mib=" -> ".join(f"{r / MiB:.1f}" for r in rss), rss_growth_first10_kib=rss_first10 // 1024,
           rss_growth_last30_kib=rss_last30 // 1024,
           cuda_used_mib=" -> ".join(f"{c / MiB:.1f}" for c in cuda),
           cuda_growth_first10_kib=cuda_first10 // 1024, cuda_growth_last30_kib=cuda_last30 // 1024)
    assert stats1["builds"] - stats0["builds"] == 40
    assert stats1["evictions"] - stats0["evictions"] >= 38
    assert stats1["size"] <= 2
    # Linear growth would make the last 30 builds grow memory 3x as much as the first 10.
    assert rss_last30 < max(8 * MiB, rss_first10), "host memory grows with every evicted graph"
    assert cuda_last30 < max(8 * MiB, cuda_first10), "device memory grows with every evicted graph"


# --- Bad input: after each error a valid call works and no broken entry is cached -------------

def raises(graph, score, tensors):
    raise LookupError("raised inside the score_mod")


def returns_none(graph, score, tensors):
    graph.mul(score, 2.0)


def unused_ops(graph, score, tensors):
    graph.exp(graph.gen_index(score, 2))  # computed, never used
    return graph.add(score, 1.0)


def test_values_a_score_mod_never_uses_are_dropped_not_refused():
    """cuDNN 9.19 computes wrong gradients for graphs with dangling ops; the recorded program
    lowers only what the result reads, so such a score_mod now runs, and right."""
    q, k, v = make_inputs(s_q=129, s_kv=127)
    got, want = compare(q, k, v, lambda s, b, h, q_, kv: s + 1.0, score_mod=unused_ops)
    check(got, want, label="unused ops")


_KEPT = {}


def keeps_a_tensor(graph, score, tensors):
    """Keeps a tensor of its first (forward) graph and uses it again in the backward graph."""
    if "t" not in _KEPT:
        _KEPT["t"] = graph.mul(score, 1.0)
    return graph.add(score, _KEPT["t"])


def fwd_bwd(q, k, v, *args, **kwargs):
    out = cudnn_flex.flex_attention(q, k, v, *args, **kwargs)
    out.float().sum().backward()


def in_place_change_before_backward():
    q, k, v = make_inputs()
    bias = torch.zeros(1, 4, 128, 128, device="cuda")
    out = cudnn_flex.flex_attention(q, k, v, dsl_mods.add_bias, score_mod_tensors={"bias": bias})
    bias.add_(1.0)
    out.float().sum().backward()


def backward_twice():
    q, k, v = make_inputs()
    out = cudnn_flex.flex_attention(q, k, v, dsl_mods.causal)
    loss = out.float().sum()
    loss.backward()
    loss.backward()


BAD_CALLS = {
    "score_mod_raises": (lambda: fwd_bwd(*make_inputs(), raises), LookupError, "inside the score_mod"),
    "score_mod_returns_non_tensor": (lambda: fwd_bwd(*make_inputs(), returns_none), TypeError,
                                     "returned NoneType"),
    # A tensor kept from the recording of an earlier call (the first call records a right program).
    "tensor_of_another_graph": (lambda: [fwd_bwd(*make_inputs(), keeps_a_tensor) for _ in range(2)],
                                (ValueError, TypeError), "tensor of another graph"),
    "refused_head_dim_60": (lambda: fwd_bwd(*make_inputs(d=60)), ValueError, r"cuDNN refused .*cuDNN says"),
    "refused_head_dim_1024": (lambda: fwd_bwd(*make_inputs(s_q=64, d=1024)), ValueError,
                              r"cuDNN refused .*cuDNN says"),
    "score_mod_tensor_on_cpu": (lambda: fwd_bwd(*make_inputs(), dsl_mods.add_bias,
                                                score_mod_tensors={"bias": torch.zeros(1, 4, 128, 128)}),
                                ValueError, "is on cpu but q is on cuda"),
    "in_place_change_before_backward": (in_place_change_before_backward, RuntimeError,
                                        "modified by an inplace operation"),
    "backward_twice": (backward_twice, RuntimeError, "backward through the graph a second time"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_after_a_bad_call_no_broken_entry_is_cached_and_a_valid_call_works(case):
    attempt, exc, match = BAD_CALLS[case]
    _KEPT.clear()

    def stored_by_completed_builds_only(before, after):
        # Every call here is cacheable, so each completed build is stored once (a forward that
        # succeeded before a failing backward is a good entry); a failed build adds nothing.
        delta = {key: after[key] - before[key] for key in ("size", "builds", "evictions")}
        assert delta["size"] == delta["builds"] - delta["evictions"], (before, after)

    before = cudnn_flex.cache_stats()
    with pytest.raises(exc, match=match):
        attempt()
    after = cudnn_flex.cache_stats()
    stored_by_completed_builds_only(before, after)
    # The failure is not cached either: the same call fails the same way again.
    with pytest.raises(exc, match=match):
        attempt()
    stored_by_completed_builds_only(after, cudnn_flex.cache_stats())
    _KEPT.clear()
    check_valid_call_works()


# --- Empty input: a defined result on CUDA, no cuDNN launch ---------------------------------

EMPTY = {"batch": (0, 4, 32, 48), "query_sequence": (2, 4, 0, 48), "key_sequence": (2, 4, 32, 0),
         "both_sequences": (2, 4, 0, 0)}


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("mod", ["none", "dsl_causal", "dsl_alibi"])
@pytest.mark.parametrize("empty", list(EMPTY))
def test_empty_batch_or_sequence_gives_a_defined_result(empty, mod, layout):
    b, h, s_q, s_kv = EMPTY[empty]
    q, k, v = make_inputs(b=b, h=h, s_q=s_q, s_kv=s_kv, layout=layout)
    perm = TO_BHSD[layout]
    kwargs, formula = ({}, None) if mod == "none" else READY_MODS[mod](b, h, s_q, s_kv)
    kwargs = on_device(kwargs)
    builds = cudnn_flex.cache_stats()["builds"]

    out, lse = cudnn_flex.flex_attention(q, k, v, **kwargs, layout=layout, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, h, s_q)
    assert lse.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))
    assert bool((lse == float("-inf")).all())
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize()
    for grad, like in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == like.shape
        assert torch.equal(grad, torch.zeros_like(grad))
    assert cudnn_flex.cache_stats()["builds"] == builds, "an empty input built a cuDNN graph"

    # The formula agrees (zeros; lse -inf).
    qf, kf, vf = (t.detach().permute(perm).double().cpu() for t in (q, k, v))
    ref_out, ref_lse = oracle.attention(qf, kf, vf, formula)
    assert torch.equal(out.permute(perm).double().cpu(), ref_out) and torch.equal(lse.double().cpu(), ref_lse)
    check_valid_call_works()


# --- NaN / inf in q, k, v: propagate as the float32 reference does --------------------------

# One non-finite element at (batch 0, head 1, position, head-dim 3) of q, k or v (BHSD).
NONFINITE_AT = {"q": 5, "k": 7, "v": 9}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_and_inf_in_inputs_propagate_as_the_reference_does(where, value):
    q, k, v = make_inputs(b=2, h=4, s_q=64, s_kv=96, d=64, seed=5)
    clean = cudnn_flex.flex_attention(q, k, v, return_lse=True, deterministic=True)
    clean_grads = torch.autograd.grad(clean[0], (q, k, v), torch.ones_like(clean[0]))
    inputs = {"q": q, "k": k, "v": v}
    with torch.no_grad():
        poisoned = inputs[where].detach().clone()
        poisoned[0, 1, NONFINITE_AT[where], 3] = float(value)
    inputs[where] = poisoned.requires_grad_()
    q, k, v = inputs["q"], inputs["k"], inputs["v"]

    out_t, lse = cudnn_flex.flex_attention(q, k, v, return_lse=True, deterministic=True)
    ref_out, ref_lse = (t.float().cuda() for t in oracle.attention(*(t.detach().double().cpu() for t in (q, k, v))))
    out = out_t.detach().float()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # a second opinion, reported only
        sdpa = torch.nn.functional.scaled_dot_product_attention(q.detach().float(), k.detach().float(),
                                                                v.detach().float())

    def positions(t):
        return {"nan": torch.isnan(t), "+inf": t == float("inf"), "-inf": t == float("-inf")}

    def non_finite(t):
        # An inf score gives lse = +inf in the reference (logsumexp) and NaN in cuDNN (its online
        # softmax computes inf - inf): both say the row is not finite, and out agrees exactly.
        return {"non-finite": ~torch.isfinite(t)}

    where_differs = {}
    for name, got, want, kinds in (("out", out, ref_out, positions), ("lse", lse, ref_lse, non_finite)):
        for kind, mask in kinds(got).items():
            ref_mask = kinds(want)[kind]
            if not torch.equal(mask, ref_mask):
                where_differs[f"{name} {kind}"] = (f"cudnn {int(mask.sum())} vs reference {int(ref_mask.sum())} "
                                                   f"elements, {int((mask != ref_mask).sum())} differ")
    report(f"non-finite {value} in {where}", out_nan=int(torch.isnan(out).sum()),
           ref_out_nan=int(torch.isnan(ref_out).sum()), lse_nan=int(torch.isnan(lse).sum()),
           ref_lse_nan=int(torch.isnan(ref_lse).sum()), torch_sdpa_math_out_nan=int(torch.isnan(sdpa).sum()),
           differs=where_differs or "none")
    assert not where_differs, f"non-finite positions differ from the float32 reference: {where_differs}"
    # Where both are finite, the values agree as in the finite tests.
    finite = torch.isfinite(ref_out) & torch.isfinite(out)
    if finite.any():
        scale = ref_out[finite].abs().max().clamp_min(1e-6)
        assert ((out - ref_out)[finite].abs().max() / scale).item() <= TOL[torch.bfloat16]
    finite_lse = torch.isfinite(ref_lse) & torch.isfinite(lse)
    if finite_lse.any():
        assert (lse - ref_lse)[finite_lse].abs().max().item() <= LSE_ATOL

    # The backward runs, and the (batch, head) pairs that never saw the value are untouched.
    grads = torch.autograd.grad(out_t, (q, k, v), torch.ones_like(out_t))
    torch.cuda.synchronize()
    untouched = (1, slice(None))  # batch 1 never sees the value (it sits in batch 0)
    for grad, clean_grad in zip(grads, clean_grads):
        assert torch.equal(grad[untouched], clean_grad[untouched])
    assert torch.equal(out[untouched], clean[0].detach().float()[untouched])
    check_valid_call_works()
