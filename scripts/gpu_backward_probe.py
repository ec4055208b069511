"""Which score_mod forms cuDNN computes right in the backward (GPU machine; prints a table).

Each form runs through cuDNN in bf16 and through the float32 reference; the max relative error
of out, dq, dk, dv is printed (nan: cuDNN returned NaN; 'refused': cudnn-flex refuses the
backward). The forms cuDNN 9.19 got wrong set NAN_IN_BACKWARD in _registry.py and the table in
docs/dsl_ops.md; run this on a new cuDNN to see what can be allowed.

    python3 scripts/gpu_backward_probe.py             # as cudnn-flex runs them
    python3 scripts/gpu_backward_probe.py --no-refuse # what cuDNN itself computes for every form
"""

from __future__ import annotations

import argparse
import warnings

import torch

import cudnn_flex
from cudnn_flex import _registry

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
}


def rel(a, b):
    return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-9)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-refuse", action="store_true", help="build the refused backwards too")
    if parser.parse_args().no_refuse:
        _registry.refuse_nan_in_backward = lambda program, replay: None
    warnings.simplefilter("ignore")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 129, 64, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    refused = _registry.NAN_IN_BACKWARD
    print(f"cuDNN {cudnn_flex.versions()['cudnn_runtime']}; refused in backward now: {refused}")
    print(f"{'form':<20} {'out':>8} {'dq':>8} {'dk':>8} {'dv':>8}")
    for name, mod in FORMS.items():
        qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
        want = cudnn_flex.flex_attention(qf, kf, vf, mod, backend="reference")
        grads = torch.autograd.grad(want, (qf, kf, vf), torch.ones_like(want))
        out = cudnn_flex.flex_attention(q, k, v, mod)
        try:
            got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            cells = [rel(a, b) for a, b in zip((out,) + got, (want,) + grads)]
            print(f"{name:<20} " + " ".join(f"{c:8.4f}" for c in cells))
        except cudnn_flex.BackwardNotSupported:
            print(f"{name:<20} {rel(out, want):8.4f}  refused")


if __name__ == "__main__":
    main()
