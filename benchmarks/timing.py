"""How times are taken: GPU time (CUDA events), the first call (cold: builds and compiles
included), and host time per cached call. Only these functions touch the clock."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def cuda_median_ms(fn: Callable, warmup: int, iters: int) -> float:
    """Median GPU time of fn over `iters` back-to-back calls (events around each), after warm-up.
    Back to back, so the GPU never waits on the host between calls and host time stays out."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def first_call_s(fn: Callable) -> float:
    """Wall time of one synchronized call: for a first call, the graph build or torch.compile."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def host_us(fn: Callable, calls: int, repeats: int = 5, warmup: int = 20) -> float:
    """Host time per call: wall time for `calls` calls to return, without waiting for the GPU
    (launches are asynchronous; `calls` stays far below the launch queue's depth), median of
    `repeats` loops."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def host_us_paired(fn: Callable, anchor: Callable, calls: int, rounds: int = 7, warmup: int = 20) -> tuple:
    """(fn's host us per call, the anchor's, fn's over the anchor's): rounds of one loop of each,
    back to back, the order swapped every round, each ratio taken within its round and the
    median of each kept. A busy host slows both loops of a round alike, so the ratio holds where
    a host time measured minutes before the other's would not (issue 15's ratios against SDPA)."""
    for _ in range(warmup):
        fn()
        anchor()
    torch.cuda.synchronize()
    mine, theirs, ratios = [], [], []
    for r in range(rounds):
        pair = {}
        for name, f in ((("fn", fn), ("anchor", anchor)) if r % 2 == 0 else (("anchor", anchor), ("fn", fn))):
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            pair[name] = (time.perf_counter() - t0) / calls * 1e6
            torch.cuda.synchronize()
        mine.append(pair["fn"])
        theirs.append(pair["anchor"])
        ratios.append(pair["fn"] / pair["anchor"])
    return statistics.median(mine), statistics.median(theirs), statistics.median(ratios)


def fwd_and_fwd_bwd(run: Callable, inputs: dict) -> tuple:
    """The two timed closures of a runner: forward under no_grad, and forward + autograd.grad."""
    q, k, v, do = inputs["q"], inputs["k"], inputs["v"], inputs["do"]

    def fwd():
        with torch.no_grad():
            run(q, k, v)

    def fwd_bwd():
        out = run(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)
    return fwd, fwd_bwd
