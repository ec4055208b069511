"""check_score_mod_bprop: is a hand-written score_mod_bprop the derivative of its score_mod?"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch

from . import _registry
from .program.record import D_P, SCORE, mod_slot
from .program.replay import Replay
from .reference import RefTensor, ReferenceGraph


class BpropMismatchError(AssertionError):
    """Raised by check_score_mod_bprop when a bprop disagrees with autograd of its score_mod."""


def derived_pair(score_mod: Callable, tensors: Optional[Mapping[str, torch.Tensor]], shape):
    """(score_mod, bprop) that evaluate the recorded program of score_mod and its derived bprop
    (what cuDNN runs) on whatever graph they are given."""
    names = list(tensors or {})
    program = _registry.record(score_mod, None, names, [tensors[n].dtype for n in names], shape=shape)
    return program_pair(program, names)


def program_pair(program, names=()):
    """(score_mod, bprop) in the DSL's signature that evaluate a recorded program; the tensors
    dict they get names its input slots in order."""
    state = {}

    def forward(graph, score, ts):
        slots = {SCORE: score}
        slots.update((mod_slot(i), ts[n]) for i, n in enumerate(names))
        state["replay"] = replay = Replay(program, graph, slots)
        return replay.value(program.fwd_out)

    def backward(graph, d_p, ts):
        if program.bprop_error is not None:
            raise program.bprop_error
        if program.bwd_out is None:
            return d_p  # dP passes through
        replay = state.pop("replay")
        replay.slots[D_P] = d_p
        return replay.value(program.bwd_out)
    return forward, backward


def check_score_mod_bprop(score_mod: Callable, score_mod_bprop: Optional[Callable] = None,
                          tensors: Optional[Mapping[str, torch.Tensor]] = None,
                          shape: Sequence[int] = (2, 3, 16, 24), *,
                          bprop_tensors: Optional[Mapping[str, torch.Tensor]] = None,
                          score_scale: float = 3.0, rtol: float = 1e-6, atol: float = 1e-9,
                          seed: int = 0, show: int = 5) -> float:
    """Compares score_mod_bprop(graph, dP, tensors) with the true gradient of score_mod.

    Without score_mod_bprop, checks the bprop that cudnn-flex derives from score_mod's ops (the
    one cuDNN runs when no bprop is given).

    Both run on the reference graph in float64 on random scores (normal * score_scale) and a random
    dP of `shape` [B, H, Sq, Skv]; the score_mod runs first, so a stateful bprop sees what its
    forward kept. Returns the max absolute error; raises BpropMismatchError listing up to `show`
    positions (b, h, q, kv) with both values when any error exceeds atol + rtol * |expected|.
    Positions where the forward output is not finite (masked) are skipped.
    """
    if score_mod_bprop is None:
        score_mod, score_mod_bprop = derived_pair(score_mod, tensors, shape)
    if len(shape) != 4:
        raise ValueError(f"cudnn_flex: shape must be [B, H, Sq, Skv], got {list(shape)}")
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(*shape, generator=g, dtype=torch.float64) * score_scale).requires_grad_()
    d_p = torch.randn(*shape, generator=g, dtype=torch.float64)
    graph = ReferenceGraph(shape, scores.device, torch.float64)

    def wrap(ts):
        return {name: RefTensor(t.double() if t.is_floating_point() else t, graph) for name, t in (ts or {}).items()}

    out = score_mod(graph, RefTensor(scores, graph), wrap(tensors))
    out = out.value.expand(shape)
    finite = torch.isfinite(out)
    (expected,) = torch.autograd.grad(out, scores, torch.where(finite, d_p, 0.0), allow_unused=True)
    if expected is None:
        expected = torch.zeros_like(scores)
    got = score_mod_bprop(graph, RefTensor(d_p, graph),
                          wrap(bprop_tensors if bprop_tensors is not None else tensors))
    if not isinstance(got, RefTensor):
        raise TypeError(f"cudnn_flex: score_mod_bprop returned {type(got).__name__}; it must return "
                        "the graph tensor it computed from dP")
    got = got.value.to(torch.float64).expand(shape)
    err = torch.where(finite, (got - expected).abs(), 0.0)
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        where = bad.nonzero()[:show].tolist()
        lines = [f"  at (b, h, q, kv) = {tuple(i)}: bprop gave {got[tuple(i)].item():.6g}, "
                 f"autograd of score_mod gives {expected[tuple(i)].item():.6g} "
                 f"(score {scores[tuple(i)].item():.4g}, dP {d_p[tuple(i)].item():.4g})" for i in where]
        raise BpropMismatchError(
            f"cudnn_flex: score_mod_bprop disagrees with the derivative of score_mod at "
            f"{int(bad.sum())} of {bad.numel()} positions (max error {err.max().item():.3g}):\n"
            + "\n".join(lines))
    return err.max().item()
