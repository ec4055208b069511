"""The whole DSL on cuDNN against the DSL written out on torch (GPU): random programs, each op
alone, and every derivative rule of the derived bprop.

- 240 random programs whose derivative w.r.t. the score is 1, and 120 whose score runs through
  chains of differentiable ops (the derived bprop's rules, inside cuDNN);
- every op alone with an O(1) effect on the scores, on index-based inputs and, for the
  differentiable ops, on the score in each operand position (test_random_programs.py shows on the
  CPU that each probe fails when its op computes something else or loses its derivative);
- the random programs and the index-based probes at one query row (a decode step), forward
  only, and some of the programs with their gradients: cuDNN 9.19 refuses some programs at one
  row that it takes at two (seed 42: erf over tanh_backward), which then run two rows (_ops.fwd);
- the derived-bprop cases of test_derived_bprop.py (one table for CPU and GPU).

Expected values: oracle.attention in float64 with dsl_torch's formula, on the values cuDNN saw.
docs/dsl_ops.md says every op fuses: a refusal by cuDNN fails the test. With $OUT set, each
probe's errors go to $OUT/op_probe.jsonl.
"""

import json
import os

import pytest
import torch

import cudnn_flex
import oracle
from gpu_cases import check, compare, dsl_formula, make_inputs
from random_programs import (ADD_SELECT_SEEDS, PROBE_SHAPE, SCORE_PATH_SEEDS, SingleOp, probe_cases, program,
                             program_tensors)
from test_derived_bprop import CASES as BPROP_CASES
from test_derived_bprop import SHAPE as BPROP_SHAPE
from test_derived_bprop import TENSORS as BPROP_TENSORS

pytestmark = pytest.mark.gpu
B, H, S, _ = PROBE_SHAPE
D = 64
TOL = 3e-2  # bf16 inputs, relative to max |expected|; scores move by O(1) (lse: gpu_cases.LSE_ATOL)


def _record(name, row):
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "a") as f:
            f.write(json.dumps(row) + "\n")


def _run(score_mod, seed, tensors, label):
    q, k, v = make_inputs(b=B, h=H, s_q=S, d=D, seed=seed)
    got, want = compare(q, k, v, dsl_formula(score_mod, tensors), score_mod=score_mod, score_mod_tensors=tensors)
    return check(got, want, tol=TOL, label=label)


@pytest.mark.parametrize("seed", ADD_SELECT_SEEDS)
def test_random_program_matches_formula(seed):
    prog = program(seed)
    _run(prog, seed, program_tensors(B, H, S, S, "cpu", seed), prog.text)


@pytest.mark.parametrize("seed", SCORE_PATH_SEEDS)
def test_random_program_through_the_score_matches_formula(seed):
    prog = program(seed)
    _run(prog, seed, program_tensors(B, H, S, S, "cpu", seed), prog.text)


@pytest.mark.parametrize("op,mode", probe_cases(), ids=lambda x: x)
def test_each_op_alone(op, mode):
    probe = SingleOp(op, mode)
    try:
        errs = _run(probe, 7, program_tensors(B, H, S, S, "cpu", 7), repr(probe))
    except Exception as e:
        _record("op_probe.jsonl", {"op": op, "mode": mode, "passed": False, "error": str(e)[:400]})
        raise
    _record("op_probe.jsonl", {"op": op, "mode": mode, "passed": True, "errors": errs})


def _first_row(tensors: dict) -> dict:
    """The score_mod tensors of _run's shape for its first query row alone: their rows past the
    first dropped (so a probe's margins still hold)."""
    return {name: t[:, :, :1].contiguous() if t.shape[2] == S else t for name, t in tensors.items()}


def _one_row_forward(score_mod, seed, tensors, label):
    """The first query row of the scores of _run's shape, alone and without a backward."""
    q, k, v = (t.detach() for t in make_inputs(b=B, h=H, s_q=1, s_kv=S, d=D, seed=seed))
    first_row = _first_row(tensors)
    with torch.no_grad():
        out, lse = cudnn_flex.flex_attention(q, k, v, score_mod, score_mod_tensors={
            name: t.cuda() for name, t in first_row.items()}, return_lse=True)
    want_out, want_lse = oracle.attention(*(t.double().cpu() for t in (q, k, v)), dsl_formula(score_mod, first_row))
    return check({"out": out.double().cpu(), "lse": lse.double().cpu()}, {"out": want_out, "lse": want_lse},
                 tol=TOL, label=label)


@pytest.mark.parametrize("seed", ADD_SELECT_SEEDS)
def test_random_program_at_one_query_row_matches_formula(seed):
    prog = program(seed)
    _one_row_forward(prog, seed, program_tensors(B, H, S, S, "cpu", seed), prog.text)


@pytest.mark.parametrize("seed", [*ADD_SELECT_SEEDS[::4], *SCORE_PATH_SEEDS[::2]])
def test_random_program_at_one_query_row_with_its_gradients(seed):
    """A quarter of the programs, and half of those through the score (their derived bprop inside
    cuDNN), at one query row: out, lse and the three gradients."""
    prog = program(seed)
    tensors = _first_row(program_tensors(B, H, S, S, "cpu", seed))
    q, k, v = make_inputs(b=B, h=H, s_q=1, s_kv=S, d=D, seed=seed)
    got, want = compare(q, k, v, dsl_formula(prog, tensors), score_mod=prog, score_mod_tensors=tensors)
    check(got, want, tol=TOL, label=prog.text)


@pytest.mark.parametrize("op", [op for op, mode in probe_cases() if mode == "index"])
def test_each_op_alone_at_one_query_row(op):
    probe = SingleOp(op, "index")
    _one_row_forward(probe, 7, program_tensors(B, H, S, S, "cpu", 7), repr(probe))


@pytest.mark.parametrize("name", BPROP_CASES)
def test_derived_bprop_rule_on_cudnn(name):
    score_mod = BPROP_CASES[name]
    tensors = {k: t.float() for k, t in BPROP_TENSORS.items()}  # what cuDNN gets, for the formula too
    b, h, s_q, s_kv = BPROP_SHAPE
    q, k, v = make_inputs(b=b, h=h, s_q=s_q, s_kv=s_kv, d=D, seed=11)
    got, want = compare(q, k, v, dsl_formula(score_mod, tensors), score_mod=score_mod, score_mod_tensors=tensors)
    check(got, want, label=name)
