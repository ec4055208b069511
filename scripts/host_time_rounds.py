"""Each kind of cached call against SDPA in interleaved rounds (issue 15): the whole forward call
(no_grad, B=1 H=1 S=64 D=64) of every kind in scripts/host_time_split.py, 15 rounds of 300 calls,
SDPA's in the same rounds; median host us per call and its ratio to SDPA's. Interleaving keeps a
busy moment of the host from landing on one kind only. Needs a GPU. docs/benchmarks.md reads it.

    PYTHONPATH=python:. python3 scripts/host_time_rounds.py TAG    (TAG names the run in each line)"""
import statistics
import sys

import torch

from benchmarks.timing import host_us
from scripts.host_time_split import kinds

tag = sys.argv[1]
times: dict = {name: [] for name in kinds}
with torch.no_grad():
    for call in kinds.values():  # each kind built and remembered before the rounds
        call()
        call()
    for _ in range(15):
        for name, call in kinds.items():
            times[name].append(host_us(call, calls=300, repeats=1, warmup=20))
sdpa = statistics.median(times["sdpa"])
for name, ts in times.items():
    median = statistics.median(ts)
    print(f"ROUNDS {tag} {name:14s} median {median:6.1f} us  x{median / sdpa:4.2f}", flush=True)
