"""Which score_mod forms cuDNN computes right in the backward (GPU machine; prints a table).

Each form runs through cuDNN in bf16 and through the float32 reference; the max relative error
of out, dq, dk, dv is printed (nan: cuDNN returned NaN). On cuDNN 9.19 every form with a bprop
had NaN dV at S = 129 (and was right at 128) until the backward graph masked the tile's padding
(csrc/score_mod_bridge.h); docs/dsl_ops.md has the table. Run it on a new cuDNN to see whether
the rewrites are still needed.

    python3 scripts/gpu_backward_probe.py                  # S = 129: a partial tile
    python3 scripts/gpu_backward_probe.py --length 128     # whole tiles
"""

from __future__ import annotations

import argparse
import warnings

import torch

import cudnn_flex

FORMS = {
    "softcap": lambda g, s, t: g.mul(g.tanh(g.div(s, 3.0)), 3.0),
    "exp(s/2)": lambda g, s, t: g.exp(g.mul(s, 0.5)),
    "log(exp(s/2)+1)": lambda g, s, t: g.log(g.add(g.exp(g.mul(s, 0.5)), 1.0)),
    "sin(s)": lambda g, s, t: g.sin(s),
    "cos(s)": lambda g, s, t: g.cos(s),
    "tan(s/10)": lambda g, s, t: g.tan(g.mul(s, 0.1)),
    "gelu(s)": lambda g, s, t: g.gelu(s),
    "s*s/8": lambda g, s, t: g.mul(g.mul(s, s), 0.125),
    "s*sigmoid(s)": lambda g, s, t: g.mul(s, g.sigmoid(s)),
    "s/(|s|+2)": lambda g, s, t: g.div(s, g.add(g.abs(s), 2.0)),
    "sqrt(|s|+1)": lambda g, s, t: g.sqrt(g.add(g.abs(s), 1.0)),
    "log(|s|+1)": lambda g, s, t: g.log(g.add(g.abs(s), 1.0)),
    "pow(|s|+1, 1.5)": lambda g, s, t: g.pow(g.add(g.abs(s), 1.0), 1.5),
    "rsqrt(|s|+1)": lambda g, s, t: g.rsqrt(g.add(g.abs(s), 1.0)),
    "1/(|s|+2)": lambda g, s, t: g.reciprocal(g.add(g.abs(s), 2.0)),
    "erf(s)": lambda g, s, t: g.erf(s),
    "max(s, 0)": lambda g, s, t: g.max(s, 0.0),
    "softplus(s)": lambda g, s, t: g.softplus(s),
    "1 - s/2": lambda g, s, t: g.sub(1.0, g.mul(s, 0.5)),
    "(3s - (s+1))/2": lambda g, s, t: g.div(g.sub(g.mul(s, 3.0), g.add(s, 1.0)), 2.0),
    "ceil(s) - s/10": lambda g, s, t: g.sub(g.ceil(s), g.mul(s, 0.1)),
    "where(kv>q, -inf, s)": lambda g, s, t: g.binary_select(float("-inf"), s,
                                                            g.cmp_gt(g.gen_index(s, 3), g.gen_index(s, 2))),
}


def rel(a, b):
    return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-9)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=129,
                        help="Sq = Skv (default 129: a partial tile, where cuDNN's padding shows)")
    parser.add_argument("--only", default="", help="comma-separated form names (default: all)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, args.length, 64, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    print(f"cuDNN {cudnn_flex.versions()['cudnn_runtime']}; S = {args.length}")
    print(f"{'form':<20} {'out':>8} {'dq':>8} {'dk':>8} {'dv':>8}")
    chosen = args.only.split(",") if args.only else list(FORMS)
    for name, mod in ((n, FORMS[n]) for n in chosen):
        qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
        want = cudnn_flex.flex_attention(qf, kf, vf, mod, backend="reference")
        grads = torch.autograd.grad(want, (qf, kf, vf), torch.ones_like(want))
        out = cudnn_flex.flex_attention(q, k, v, mod)
        got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        cells = [rel(a, b) for a, b in zip((out,) + got, (want,) + grads)]
        print(f"{name:<20} " + " ".join(f"{c:8.4f}" for c in cells))

if __name__ == "__main__":
    main()
