"""Where a cached call's host time goes (issue 15): per kind of call, the whole call, the C++ op
alone with the call's own arguments (_C.fwd), and the Python alone (the op replaced by one that
returns what it returned), in us per call, forward under no_grad, B=1 H=1 S=64 D=64; and the host
time of three single torch ops for scale. Needs a GPU. docs/benchmarks.md reads it.
(scripts/host_profile.py splits one kind of call by layer instead.)

    PYTHONPATH=python:. python3 scripts/host_time_split.py TAG    (TAG names the run in each line;
    the repo root on the path for benchmarks.timing)"""
import sys

import torch
import torch.nn.functional as F

import cudnn_flex
from benchmarks.timing import host_us
from cudnn_flex import _ops, dsl_mods, mods

dev = "cuda"
q, k, v = (torch.randn(1, 1, 64, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
slopes = {"slopes": mods.alibi_slopes(1).view(1, 1, 1, 1).to(dev)}
host_slope = {"slopes": mods.alibi_slopes(1).view(1, 1, 1, 1)}  # one element on the CPU: passed by value
bias = {"bias": torch.randn(1, 1, 64, 64, device=dev)}
ids32 = (torch.arange(64, device=dev) // 16).to(torch.int32)
ids64 = (torch.arange(64, device=dev) // 16)
doc32, doc64 = mods.document_mask(ids32), mods.document_mask(ids64)
talibi_mod = mods.alibi(mods.alibi_slopes(1).to(dev))  # one closure: the shortcut's case
tsoftcap = mods.softcap(20.0)
keyed = dsl_mods.softcap(20.0)  # an object with score_mod_graph_cache_key()
lens = torch.tensor([50], dtype=torch.int32, device=dev)
short_q = torch.tensor([63], dtype=torch.int32, device=dev)  # a row past its length: the op clears out and lse
tq, tk, tv = (torch.randn(64, 2, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
cu = torch.tensor([0, 20, 64], dtype=torch.int32, device=dev)


def vl(**kw):
    return cudnn_flex.flex_attention_varlen(tq, tk, tv, cu, cu, max_seqlen_q=44, max_seqlen_kv=44, **kw)


kinds = {
    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "no mod": lambda: cudnn_flex.flex_attention(q, k, v),
    "causal": lambda: cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal),
    "dsl causal": lambda: cudnn_flex.flex_attention(q, k, v, dsl_mods.causal),
    "keyed softcap": lambda: cudnn_flex.flex_attention(q, k, v, keyed.forward, keyed.backward),
    "t softcap": lambda: cudnn_flex.flex_attention(q, k, v, score_mod=tsoftcap),
    "dsl alibi 1": lambda: cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=host_slope),
    "talibi": lambda: cudnn_flex.flex_attention(q, k, v, score_mod=talibi_mod),
    "dsl alibi T": lambda: cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=slopes),
    "dsl bias T": lambda: cudnn_flex.flex_attention(q, k, v, dsl_mods.add_bias, score_mod_tensors=bias),
    "padded kv": lambda: cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lens),
    "padded q short": lambda: cudnn_flex.flex_attention(q, k, v, seq_lens_q=short_q, seq_lens_kv=lens),
    "doc int32": lambda: cudnn_flex.flex_attention(q, k, v, mask_mod=doc32),
    "doc int64": lambda: cudnn_flex.flex_attention(q, k, v, mask_mod=doc64),
    "varlen no mod": lambda: vl(),
}


SINGLE_OPS = {  # single torch calls from Python, for scale
    "ids32.to(f32)": lambda: ids32.to(torch.float32),
    "empty(64,f32)": lambda: torch.empty(64, device=dev),
    "ids32.as_strided": lambda: ids32.as_strided((1, 1, 64, 1), (0, 0, 1, 0), 0),
}


def host(fn) -> float:
    """Median host us per call over 7 loops of 300 calls, the GPU idle before each loop."""
    return host_us(fn, calls=300, repeats=7, warmup=30)


class Recorder:
    """The extension, keeping the arguments and results of the first fwd it runs."""

    def __init__(self, real):
        self.real, self.args, self.result = real, None, None

    def fwd(self, *args):
        result = self.real.fwd(*args)
        if self.args is None:
            self.args, self.result = args, result
        return result


class Replay:
    """In place of the extension: returns a recorded result, running nothing."""

    def __init__(self, result):
        self.result = result

    def fwd(self, *args):
        return self.result


def split(name, call) -> str:
    whole = host(call)
    if name == "sdpa":
        return f"whole {whole:6.1f}"
    real = _ops._C
    try:
        _ops._C = recorder = Recorder(real)
        call()
        if recorder.args is None:
            return f"whole {whole:6.1f}  (the op was not reached through _C.fwd)"
        _ops._C = Replay(recorder.result)
        python = host(call)
    finally:
        _ops._C = real
    op = host(lambda: real.fwd(*recorder.args))
    return f"whole {whole:6.1f}  op {op:6.1f}  python {python:6.1f}"


if __name__ == "__main__":  # (the kinds above can be imported without running the split)
    tag = sys.argv[1]
    with torch.no_grad():
        for name, call in kinds.items():
            print(f"SPLIT {tag} {name:14s} {split(name, call)}", flush=True)
        for name, call in SINGLE_OPS.items():
            print(f"SPLIT {tag} {name:14s} whole {host(call):6.1f}", flush=True)
