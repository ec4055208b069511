"""The random programs and single-op probes of the GPU tests, checked on the CPU.

- Their expected values (dsl_torch: the DSL written out on torch) agree with cudnn-flex's
  reference path in float64, out, lse and gradients: two independent evaluations of each op.
- The derived bprop of every score-path program matches autograd (check_score_mod_bprop).
- The GPU probes can fail: an op replaced by a plausible wrong one (identity, the first operand,
  the negated comparison, swapped branches, its derivative dropped) moves the expected values by
  well over the GPU tolerance; and no probe input sits so close to a discontinuity (a floor, a
  comparison, a mod) that cuDNN's rounding could flip it.
"""

from __future__ import annotations

import pytest
import torch

import cudnn_flex
import oracle
from dsl_torch import TorchGraph, formula
from gpu_cases import LSE_ATOL, errors
from random_programs import (ADD_SELECT_SEEDS, COMPARE, PROBE_SHAPE, SCORE_PATH_SEEDS, SingleOp, probe_cases,
                             probe_margins, program, program_tensors)

PROBE_TOL = 3e-2  # test_gpu_random_programs.TOL: relative, out and gradients (lse: LSE_ATOL)


def qkv(shape, seed=0, d=16):
    b, h, s_q, s_kv = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64).requires_grad_() for n in (s_q, s_kv, s_kv)]


def evaluate(shape, fn, seed=0, d=16, grads=True):
    """out, lse, dq, dk, dv of oracle.attention with formula fn (float64); out, lse only
    without grads."""
    q, k, v = qkv(shape, seed, d)
    if not grads:
        with torch.no_grad():
            out, lse = oracle.attention(q, k, v, fn)
        return {"out": out, "lse": lse}
    out, lse = oracle.attention(q, k, v, fn)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), d_out, allow_unused=True, materialize_grads=True)
    return dict(zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)))


def reference_path(shape, score_mod, tensors, seed=0, d=16):
    q, k, v = qkv(shape, seed, d)
    out, lse = cudnn_flex.flex_attention(q, k, v, score_mod, score_mod_tensors=tensors, return_lse=True,
                                         backend="reference")
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return dict(zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *torch.autograd.grad(out, (q, k, v), d_out))))


def assert_agree(got, want, label):
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-7, atol=1e-9,
                                   msg=lambda m: f"{label} {name}: {m}")


SMALL = (2, 2, 12, 20)


@pytest.mark.parametrize("seed", list(ADD_SELECT_SEEDS[::8]) + list(SCORE_PATH_SEEDS[::4]))
def test_program_formula_agrees_with_the_reference_path(seed):
    prog = program(seed)
    tensors = program_tensors(*SMALL, "cpu", seed)
    assert_agree(reference_path(SMALL, prog, tensors), evaluate(SMALL, formula(prog, tensors)), prog.text)


@pytest.mark.parametrize("seed", SCORE_PATH_SEEDS)
def test_score_path_programs_have_a_derived_bprop_that_matches_autograd(seed):
    prog = program(seed)
    assert prog.score_path and prog._has_score(prog.body)
    shape = (2, 3, 16, 24)
    cudnn_flex.check_score_mod_bprop(prog, None, program_tensors(*shape, "cpu", seed), shape, score_scale=1.0,
                                     rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("op,mode", probe_cases(), ids=lambda x: x)
def test_probe_formula_agrees_with_the_reference_path(op, mode):
    shape = (1, 2, 16, 40)
    tensors = program_tensors(*shape, "cpu", 7)
    probe = SingleOp(op, mode)
    assert_agree(reference_path(shape, probe, tensors), evaluate(shape, formula(probe, tensors)), repr(probe))


# --- The probes can fail ------------------------------------------------------------------------

NEGATED = {"cmp_gt": "cmp_le", "cmp_ge": "cmp_lt", "cmp_lt": "cmp_ge", "cmp_le": "cmp_gt",
           "cmp_eq": "cmp_neq", "cmp_neq": "cmp_eq"}


class Mutated:
    """A TorchGraph with one op replaced by `fn(real_op)`."""

    def __init__(self, graph: TorchGraph, op: str, mutate):
        self._graph, self._op, self._mutate = graph, op, mutate

    def __getattr__(self, name):
        real = getattr(self._graph, name)
        return self._mutate(real, self._graph) if name == self._op else real


def value_mutation(op):
    """A plausible wrong forward for op (what a lowering or op-table bug would give)."""
    if op == "identity":
        return lambda real, g: (lambda x, *a, **k: -x)
    if op == "gen_index":
        return lambda real, g: (lambda x, axis, **k: real(x, 2 if axis == 3 else 3))
    if op in NEGATED:
        return lambda real, g: getattr(g, NEGATED[op])
    if op in ("logical_and", "logical_or"):
        return lambda real, g: getattr(g, "logical_or" if op == "logical_and" else "logical_and")
    if op == "binary_select":
        return lambda real, g: (lambda a, b, mask, **k: real(b, a, mask))
    # unary: identity; binary (the *_backward ops too): the first operand
    return lambda real, g: (lambda x, *a, **k: x)


def derivative_mutation(op):
    """The op's value with its derivative dropped (the gradient stops there)."""
    return lambda real, g: (lambda *a, **k: real(*a, **k).detach())


def mutated_formula(probe, tensors, mutate):
    plain = formula(probe, tensors)

    def fn(s, b, h, q, kv):
        grids = (b, h, q, kv)
        t = {name: x.detach().double() for name, x in tensors.items()}
        return probe(Mutated(TorchGraph(grids), probe.op, mutate), s, t)
    return plain, fn


def moved_by(op, mode, mutate, names):
    tensors = program_tensors(*PROBE_SHAPE, "cpu", 7)
    plain, wrong = mutated_formula(SingleOp(op, mode), tensors, mutate)
    grads = not {"out", "lse"} >= set(names)
    errs = errors(evaluate(PROBE_SHAPE, wrong, seed=7, d=64, grads=grads),
                  evaluate(PROBE_SHAPE, plain, seed=7, d=64, grads=grads))
    return {name: errs[name] for name in names}


@pytest.mark.parametrize("op", sorted({op for op, mode in probe_cases() if mode == "index"}))
def test_an_index_probe_fails_when_its_op_computes_something_else(op):
    moved = moved_by(op, "index", value_mutation(op), ("out", "lse"))
    # At least three times the GPU tolerance, so that the probe fails however cuDNN rounds.
    assert moved["out"] > 3 * PROBE_TOL or moved["lse"] > 3 * LSE_ATOL, moved


@pytest.mark.parametrize("op,mode", [(op, mode) for op, mode in probe_cases() if mode != "index"], ids=lambda x: x)
def test_a_score_probe_fails_when_its_op_loses_its_derivative(op, mode):
    moved = moved_by(op, mode, derivative_mutation(op), ("dq", "dk"))
    assert max(moved.values()) > 3 * PROBE_TOL, moved


@pytest.mark.parametrize("op", sorted({op for op, mode in probe_cases() if mode == "index"}))
def test_probe_inputs_keep_clear_of_discontinuities(op):
    # The inputs are O(1): cuDNN's fused multiply-adds and float32 roundings move them by < 1e-6.
    assert probe_margins(op, program_tensors(*PROBE_SHAPE, "cpu", 7)) > 1e-5


def test_every_op_is_probed_and_comparisons_have_a_negation():
    ops = {op for op, _ in probe_cases()}
    assert set(COMPARE) <= set(NEGATED) and len(ops) == 54
