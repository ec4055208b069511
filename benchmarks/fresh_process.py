"""The first forward + backward of a mod in a new process, with an empty and with a warm plan store.

This is the start-up cost every job and every inference-server replica pays (issue 15). Each run
is a subprocess with CUDNN_FLEX_CACHE_DIR pointing at one temporary store: the first builds and
stores the plans, the second loads them. The second's results are compared bitwise with the
first's, because a loaded plan gave a wrong causal forward on the H100 (README, "Plans on disk").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

# softcap + causal (a derived bprop and the tile-skipping band), bf16, timed after CUDA is up.
SCRIPT = r"""
import json, sys, time
import torch, cudnn_flex
from cudnn_flex import mods
heads, seq, dim = (int(x) for x in sys.argv[2:5])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, heads, seq, dim, generator=g).to("cuda", torch.bfloat16).requires_grad_()
           for _ in range(3))
torch.cuda.synchronize()
t0 = time.perf_counter()
out = cudnn_flex.flex_attention(q, k, v, mods.softcap(20.0), mask_mod=mods.causal, deterministic=True)
torch.cuda.synchronize()
t1 = time.perf_counter()
out.float().sum().backward()
torch.cuda.synchronize()
t2 = time.perf_counter()
torch.save([t.detach().cpu() for t in (out, q.grad, k.grad, v.grad)], sys.argv[1])
stats = cudnn_flex.cache_stats()
print(json.dumps({"fwd_s": t1 - t0, "bwd_s": t2 - t1, "plan_loads": stats["plan_loads"],
                  "plan_stores": stats["plan_stores"]}))
"""

LABELS = ("new process, empty plan store", "new process, warm plan store")


def measure(args, log=print) -> dict:
    """{label: {fwd_s, bwd_s, plan_loads, plan_stores[, same_bits]}} for LABELS."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, CUDNN_FLEX_CACHE_DIR=os.path.join(tmp, "plans"))
        results = []
        for i, label in enumerate(LABELS):
            saved = os.path.join(tmp, f"run{i}.pt")
            done = subprocess.run([sys.executable, "-c", SCRIPT, saved, str(args.heads), "1024", "128"],
                                  env=env, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                out[label] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                              f"exit {done.returncode}"}
                break
            out[label] = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(torch.load(saved))
            log(f"cold {label}: {out[label]}")
        if len(results) == 2:
            out[LABELS[1]]["same_bits"] = all(torch.equal(a, b) for a, b in zip(*results))
    return out
