"""GPU report: broadcast patterns of score_mod tensors and a few timings, as short tables.

Run by scripts/gpu_check.sh on the H100; timings are ratios against torch SDPA (cuDNN backend)
measured in the same run. Self-contained (the tests' checks are in tests/python); the broadcast
table's expected values come from cudnn-flex's float32 reference path.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import cudnn_flex
from cudnn_flex import dsl_mods, mods

# Which of (B, H, Sq, Skv) a score_mod tensor has, for all 16 broadcast patterns.
ALL_PATTERNS = [tuple(bool(i >> (3 - j) & 1) for j in range(4)) for i in range(16)]


def pattern_name(mask):
    return "".join(c if keep else "1" for c, keep in zip("BHQK", mask))


def bias_pattern(mask, b, h, s_q, s_kv, seed=0):
    shape = [n if keep else 1 for keep, n in zip(mask, (b, h, s_q, s_kv))]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).cuda()


def make_inputs(b=2, h=4, s_q=128, s_kv=None, d=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to("cuda", dtype).requires_grad_() for n in (s_q, s_kv or s_q, s_kv or s_q)]


def run_both(q, k, v, score_mod, tensors):
    """(cuDNN, float32 reference path): out, lse, dq, dk, dv of each."""
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(123)).to(q)
    results = []
    for qq, kk, vv in ((q, k, v), [t.detach().float().requires_grad_() for t in (q, k, v)]):
        backend = "cudnn" if qq.dtype != torch.float32 else "reference"
        out, lse = cudnn_flex.flex_attention(qq, kk, vv, score_mod, score_mod_tensors=tensors, return_lse=True,
                                             backend=backend)
        grads = torch.autograd.grad(out, (qq, kk, vv), d_out.to(out.dtype))
        results.append({n: t.float() for n, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads))})
    return results


def errors(got, want):
    """max |got - want| / max |want| per tensor (lse: absolute)."""
    out = {}
    for name in want:
        diff = (got[name] - want[name]).abs().max()
        out[name] = (diff if name == "lse" else diff / want[name].abs().max().clamp_min(1e-6)).item()
    return out


def broadcast_table():
    print("\n== score_mod tensor broadcast patterns: max relative error vs float32 reference ==")
    print("repr 0: broadcast dims as size 1; repr 2: the library's rule (full size, stride 0 for the six bad patterns); "
          "lse: absolute error")
    print(f"{'repr':<5} {'pattern':<8} {'bias':<9} " + " ".join(f"{k:>8}" for k in ("out", "lse", "dq", "dk", "dv")))
    b, h, s_q, s_kv = 2, 4, 128, 192
    for repr_ in (0, 2):
        cudnn_flex._C._set_broadcast_repr(repr_)
        for dtype in (torch.float32,):
            for mask in ALL_PATTERNS:
                q, k, v = make_inputs(b=b, h=h, s_q=s_q, s_kv=s_kv)
                bias = bias_pattern(mask, b, h, s_q, s_kv).to(dtype)
                try:
                    got, want = run_both(q, k, v, dsl_mods.add_bias, tensors={"bias": bias})
                    e = errors(got, want)
                    cells = " ".join(f"{e[k]:8.1e}" for k in ("out", "lse", "dq", "dk", "dv"))
                except Exception as ex:  # noqa: BLE001  (a report: show what cuDNN said)
                    cells = "error: " + str(ex).replace("\n", " ")[:150]
                print(f"{repr_:<5} {pattern_name(mask):<8} {str(dtype)[6:]:<9} {cells}", flush=True)
    cudnn_flex._C._set_broadcast_repr(2)


def cuda_ms(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(run, q, k, v):
    def step():
        out = run(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return step


def bench_table():
    b, h, s, d = 2, 16, 4096, 128
    q, k, v = make_inputs(b=b, h=h, s_q=s, d=d)
    cap = dsl_mods.softcap(30.0)
    slopes = mods.alibi_slopes(h, "cuda")

    def sdpa(causal):
        def run(q, k, v):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    def flex(**kw):
        return lambda q, k, v: cudnn_flex.flex_attention(q, k, v, **kw)

    cases = {
        "sdpa cudnn, no mask": sdpa(False),
        "sdpa cudnn, causal": sdpa(True),
        "cudnn_flex, no mod": flex(),
        "cudnn_flex, causal mod": flex(score_mod=dsl_mods.causal),
        "cudnn_flex, softcap": flex(score_mod=cap.forward, score_mod_bprop=cap.backward),
        "cudnn_flex, alibi": flex(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": slopes}),
        "cudnn_flex, rel. bias": flex(score_mod=dsl_mods.relative_bias()),
    }
    rows = []
    for name, run in cases.items():
        t0 = time.perf_counter()
        run(q, k, v)
        torch.cuda.synchronize()
        cold = time.perf_counter() - t0
        with torch.no_grad():
            f = cuda_ms(lambda: run(q, k, v))
        fb = cuda_ms(fwd_bwd(run, q, k, v))
        rows.append((name, f, fb, cold))
    base_f, base_fb = rows[0][1], rows[0][2]
    print(f"\n== GPU time, B={b} H={h} S={s} D={d} bf16, median of 20 (ratios vs sdpa cudnn no mask) ==")
    print(f"{'case':<24} {'fwd ms':>8} {'x':>6} {'fwd+bwd ms':>11} {'x':>6} {'first call s':>13}")
    for name, f, fb, cold in rows:
        print(f"{name:<24} {f:8.3f} {f / base_f:6.2f} {fb:11.3f} {fb / base_fb:6.2f} {cold:13.3f}")

    tq, tk, tv = (t.detach() for t in make_inputs(b=1, h=1, s_q=64, d=64))
    n = 2000

    def host_us(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e6

    with torch.no_grad():
        sdpa_us = host_us(lambda: sdpa(False)(tq, tk, tv))
        flex_us = host_us(lambda: cudnn_flex.flex_attention(tq, tk, tv, dsl_mods.causal))
    print(f"\nhost time per cached forward call at B=1 H=1 S=64 D=64: cudnn_flex {flex_us:.1f} us, "
          f"torch sdpa {sdpa_us:.1f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--broadcast", action="store_true")
    parser.add_argument("--bench", action="store_true")
    args = parser.parse_args()
    print("versions:", cudnn_flex.versions(), "torch", torch.__version__, torch.cuda.get_device_name())
    if args.broadcast:
        broadcast_table()
    if args.bench:
        bench_table()
