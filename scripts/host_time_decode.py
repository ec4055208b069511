"""A decode step's host time (issue 15): each kind of cached call with one query row against SDPA's
at one row, in interleaved rounds (as scripts/host_time_rounds.py), forward under no_grad, B=1 H=1
Skv=64 D=64. A score_mod that reads the head or key index runs one row as two
(_ops.needs_two_rows); the others, and no mod, run one row. Needs a GPU.

    PYTHONPATH=python:. python3 scripts/host_time_decode.py TAG [ROUNDS]"""
import statistics
import sys

import torch
import torch.nn.functional as F

import cudnn_flex
from benchmarks.timing import host_us
from cudnn_flex import dsl_mods, mods

dev = "cuda"
q = torch.randn(1, 1, 1, 64, device=dev, dtype=torch.bfloat16)
k, v = (torch.randn(1, 1, 64, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
slopes = {"slopes": mods.alibi_slopes(1).view(1, 1, 1, 1).to(dev)}
keyed = dsl_mods.softcap(20.0)
softcap = mods.softcap(20.0)
alibi = mods.alibi(mods.alibi_slopes(1).to(dev))
lengths = torch.tensor([50], dtype=torch.int32, device=dev)

kinds = {
    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    "no mod": lambda: cudnn_flex.flex_attention(q, k, v),
    "keyed softcap": lambda: cudnn_flex.flex_attention(q, k, v, keyed.forward, keyed.backward),
    "t softcap": lambda: cudnn_flex.flex_attention(q, k, v, score_mod=softcap),
    "padded kv": lambda: cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths),
    "padded softcap": lambda: cudnn_flex.flex_attention(q, k, v, score_mod=softcap, seq_lens_kv=lengths),
    "dsl alibi T (2 rows)": lambda: cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=slopes),
    "talibi (2 rows)": lambda: cudnn_flex.flex_attention(q, k, v, score_mod=alibi),
}

tag, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15
times: dict = {name: [] for name in kinds}
with torch.no_grad():
    for call in kinds.values():  # each kind built and remembered before the rounds
        call()
        call()
    for _ in range(rounds):
        for name, call in kinds.items():
            times[name].append(host_us(call, calls=300, repeats=1, warmup=20))
sdpa = statistics.median(times["sdpa"])
for name, ts in times.items():
    median = statistics.median(ts)
    print(f"DECODE {tag} {name:20s} median {median:6.1f} us  x{median / sdpa:4.2f}", flush=True)
