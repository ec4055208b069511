"""The demo: a handful of score_mods on built-in random data, as a small table.

On a GPU each runs through cuDNN and is checked against the float32 reference (max error, time);
without one the reference path runs and the demo says so.
"""

from __future__ import annotations

import time
import warnings

import torch

from . import dsl_mods, mods, reference
from .api import flex_attention


def _examples(h: int, device: str):
    cap = dsl_mods.softcap(20.0)
    slopes = mods.alibi_slopes(h, device)
    return [
        ("no score_mod", dict()),
        ("causal", dict(score_mod=dsl_mods.causal)),
        ("softcap 20 (with bprop)", dict(score_mod=cap.forward, score_mod_bprop=cap.backward)),
        ("relative bias q-kv", dict(score_mod=dsl_mods.relative_bias())),
        ("ALiBi", dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": slopes})),
    ]


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, (time.perf_counter() - start) * 1e3


def run(b: int = 2, h: int = 8, s: int = 1024, d: int = 64, seed: int = 0) -> list[dict]:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, device=device, generator=g).to(dtype).requires_grad_() for _ in range(3))
    rows = []
    for name, kwargs in _examples(h, device):
        def call():
            out = flex_attention(q, k, v, **kwargs)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            return out, grads

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the demo says which path runs; no warning per call
            call()  # first call builds the cuDNN graphs (or warms the reference path)
            (out, grads), ms = _timed(call)
        row = {"score_mod": name, "path": "cuDNN" if gpu else "reference (CPU)", "fwd+bwd ms": ms}
        if gpu:
            qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
            ref, _ = reference.attention(qf, kf, vf, kwargs.get("score_mod"), kwargs.get("score_mod_tensors"))
            ref_grads = torch.autograd.grad(ref, (qf, kf, vf), torch.ones_like(ref))
            row["max |out err|"] = (out.float() - ref).abs().max().item()
            row["max |grad err| / max |grad|"] = max(
                ((a.float() - r).abs().max() / r.abs().max()).item() for a, r in zip(grads, ref_grads))
        rows.append(row)
    return rows


def main() -> None:
    gpu = torch.cuda.is_available()
    shape = dict(b=2, h=8, s=1024, d=64) if gpu else dict(b=1, h=4, s=256, d=64)
    print("cudnn-flex demo:", "CUDA GPU found, running cuDNN (bf16) against the float32 reference"
          if gpu else "no CUDA GPU, running the PyTorch reference path on the CPU (float32)")
    print(f"shape B={shape['b']} H={shape['h']} S={shape['s']} D={shape['d']}, forward + backward\n")
    rows = run(**shape)
    columns = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(columns, widths)))


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)
