"""Where the host time of one cached flex_attention call goes (GPU machine; prints a table).

Each row times a loop of cached calls at a tiny shape (the GPU work is negligible and launches are
asynchronous), from the raw C++ op up to the public function with autograd, so the differences
are the cost of each layer.
"""

import contextlib
import time

import torch

import cudnn_flex
from cudnn_flex import _registry, dsl_mods, mods


def per_call_us(fn, n=3000):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return best


def main():
    q = torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
    qg = q.clone().requires_grad_()
    program = _registry.record(dsl_mods.causal, None, (), ())
    mod_id, bprop_id, cacheable = program.mod_id, program.bprop_id, True
    op = torch.ops.cudnn_flex.fwd.default
    cap = dsl_mods.softcap(20.0)
    softcap = mods.softcap(20.0)
    slopes = mods.alibi_slopes(1, device="cuda")
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)  # noqa: E731
    backend = torch.nn.attention.SDPBackend
    rows = [
        ("torch SDPA (the backend torch picks)", sdpa),
        ("torch SDPA, cuDNN backend", sdpa, lambda: torch.nn.attention.sdpa_kernel(backend.CUDNN_ATTENTION)),
        ("torch SDPA, FlashAttention backend", sdpa, lambda: torch.nn.attention.sdpa_kernel(backend.FLASH_ATTENTION)),
        ("C++ op alone (torch.ops.cudnn_flex.fwd, no grad)", lambda: op(q, q, q, [], [], mod_id, bprop_id, cacheable, None, False, [], [], [])),
        ("C++ op alone (_C.fwd: no boxing, no grad)",
         lambda: cudnn_flex._C.fwd(q, q, q, [], [], mod_id, bprop_id, cacheable, None, False, [], [], [])),
        ("C++ op by _C.fwd, inputs require grad",
         lambda: cudnn_flex._C.fwd(qg, qg, qg, [], [], mod_id, bprop_id, cacheable, None, False, [], [], [])),
        ("C++ op through the autograd wrapper (inputs require grad)", lambda: op(qg, qg, qg, [], [], mod_id, bprop_id, cacheable, None, False, [], [], [])),
        ("recording the program (DSL causal)", lambda: _registry.record(dsl_mods.causal, None, (), ())),
        ("flex_attention, no score_mod", lambda: cudnn_flex.flex_attention(q, q, q)),
        ("flex_attention, no grad", lambda: cudnn_flex.flex_attention(q, q, q, dsl_mods.causal)),
        ("flex_attention, inputs require grad", lambda: cudnn_flex.flex_attention(qg, qg, qg, dsl_mods.causal)),
        ("flex_attention, keyed Softcap + bprop (promise: no recording)",
         lambda: cudnn_flex.flex_attention(qg, qg, qg, cap.forward, cap.backward)),
        ("flex_attention, torch-style softcap (found by the guard)",
         lambda: cudnn_flex.flex_attention(qg, qg, qg, softcap)),
        ("flex_attention, mask_mod=mods.causal (found by the guard)",
         lambda: cudnn_flex.flex_attention(qg, qg, qg, mask_mod=mods.causal)),
        ("flex_attention, torch-style ALiBi, new closure over slopes each call",
         lambda: cudnn_flex.flex_attention(qg, qg, qg, mods.alibi(slopes))),
    ]
    print("\n== host time per cached call, B=1 H=1 S=64 D=64 bf16, causal score_mod ==")
    for name, fn, *context in rows:
        with context[0]() if context else contextlib.nullcontext():
            try:
                print(f"{name:<60} {per_call_us(fn):8.1f} us")
            except RuntimeError as e:  # e.g. an older extension without this argument
                print(f"{name:<60} n/a ({str(e).splitlines()[0][:60]})")


if __name__ == "__main__":
    main()
