"""Each kind of cached call against SDPA in interleaved rounds (issue 15): the whole call (B=1 H=1
S=64 D=64) of every kind in scripts/host_time_split.py, 15 rounds, SDPA's in the same rounds;
median host us per call and its ratio to SDPA's. Interleaving keeps a busy moment of the host
from landing on one kind only. Needs a GPU. docs/benchmarks.md reads it.

The forward runs under no_grad (300 calls a round); with --backward, q, k and v require grad and
each call is the forward and out.backward() (100 calls a round), as a training step runs it.

    PYTHONPATH=python:. python3 scripts/host_time_rounds.py TAG [--backward]
    (TAG names the run in each line)"""
import statistics
import sys

import torch

import scripts.host_time_split as split
from benchmarks.timing import host_us


def with_backward(call):
    """call() and the backward of its out, with a gradient of ones made once."""
    grad = []

    def step():
        out = call()
        if not grad:
            grad.append(torch.ones_like(out))
        out.backward(grad[0])
    return step


tag, backward = sys.argv[1], "--backward" in sys.argv[2:]
if backward:  # the kinds read these module globals at each call
    for name in ("q", "k", "v", "tq", "tk", "tv"):
        setattr(split, name, getattr(split, name).detach().requires_grad_())
    kinds, calls, mode = {name: with_backward(call) for name, call in split.kinds.items()}, 100, "fwd+bwd"
else:
    kinds, calls, mode = split.kinds, 300, "fwd"
times: dict = {name: [] for name in kinds}
with torch.set_grad_enabled(backward):
    for call in kinds.values():  # each kind built and remembered before the rounds
        call()
        call()
    for _ in range(15):
        for name, call in kinds.items():
            times[name].append(host_us(call, calls=calls, repeats=1, warmup=20))
sdpa = statistics.median(times["sdpa"])
for name, ts in times.items():
    median = statistics.median(ts)
    print(f"ROUNDS {tag} {mode} {name:14s} median {median:6.1f} us  x{median / sdpa:4.2f}", flush=True)
