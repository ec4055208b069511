"""The backward refusals the GPU tests expect (refusals.py) are exactly the library's, on the CPU.

cudnn-flex refuses the backward of score_mods with the forms cuDNN 9.19 differentiates to NaN
(cudnn_flex.BackwardNotSupported, raised when validate_graphs builds the backward graph). For every
case the GPU tests run, the library refuses if and only if refusals.py (the rule written out) says
so: a library that refused more would leave gradients untested on the GPU, one that refused less
would hand out NaN.
"""

import pytest
import torch

import cudnn_flex
from mod_cases import READY_MODS
from random_programs import PROBE_SHAPE, SCORE_PATH_SEEDS, TENSORS, SingleOp, probe_cases, program, program_tensors
from refusals import dsl_refusals, refusals, torch_refusals
from test_derived_bprop import CASES as BPROP_CASES
from test_derived_bprop import SHAPE as BPROP_SHAPE
from test_derived_bprop import TENSORS as BPROP_TENSORS
from test_torch_style_formulas import CASES as CONSTRUCTS


def library_refuses(shape, **kwargs) -> bool:
    b, h, s_q, s_kv = shape
    q = torch.zeros(b, h, s_q, 64, dtype=torch.float16)
    k = torch.zeros(b, h, s_kv, 64, dtype=torch.float16)
    try:
        cudnn_flex.validate_graphs(q, k, k, **kwargs)
    except cudnn_flex.BackwardNotSupported as e:
        assert "NaN gradients" in str(e)
        return True
    return False


def assert_same(expected, shape, label, **kwargs):
    refused = library_refuses(shape, **kwargs)
    assert refused == bool(expected), (f"{label}: the library {'refuses' if refused else 'accepts'} its backward; "
                                       f"the rule says {expected or 'accept'}")


@pytest.mark.parametrize("op,mode", probe_cases(), ids=lambda x: x)
def test_probes(op, mode):
    probe = SingleOp(op, mode)
    tensors = program_tensors(*PROBE_SHAPE, "cpu", 7)
    assert_same(dsl_refusals(probe, TENSORS), PROBE_SHAPE, repr(probe), score_mod=probe, score_mod_tensors=tensors)


@pytest.mark.parametrize("seed", SCORE_PATH_SEEDS[::6])
def test_score_path_programs_are_never_refused(seed):
    prog = program(seed)
    assert not dsl_refusals(prog, TENSORS)
    assert_same([], PROBE_SHAPE, prog.text, score_mod=prog, score_mod_tensors=program_tensors(*PROBE_SHAPE, "cpu", seed))


@pytest.mark.parametrize("name", BPROP_CASES)
def test_derived_bprop_cases(name):
    tensors = {k: t.float() for k, t in BPROP_TENSORS.items()}
    assert_same(dsl_refusals(BPROP_CASES[name], tensors), BPROP_SHAPE, name, score_mod=BPROP_CASES[name],
                score_mod_tensors=tensors)


@pytest.mark.parametrize("name", CONSTRUCTS)
def test_torch_style_constructs(name):
    score_mod, mask_mod, _ = CONSTRUCTS[name]
    shape = (2, 4, 7, 12)
    expected = torch_refusals(score_mod, shape) if score_mod is not None else []
    assert_same(expected, shape, name, score_mod=score_mod, mask_mod=mask_mod)


@pytest.mark.parametrize("name", READY_MODS)
def test_ready_mods(name):
    shape = (2, 4, 33, 40)
    kwargs, _ = READY_MODS[name](*shape)
    assert_same(refusals(kwargs, shape), shape, name, **kwargs)


def test_the_rule_has_both_outcomes():
    # The cases above are no vacuous agreement: some are refused, most are not.
    refused = [n for n, m in BPROP_CASES.items() if dsl_refusals(m, ("bias", "pos", "head"))]
    assert 5 <= len(refused) < len(BPROP_CASES) // 2
    assert torch_refusals(lambda s, b, h, q, kv: torch.sin(s), (1, 1, 2, 2))
    assert torch_refusals(lambda s, b, h, q, kv: s * torch.sigmoid(s), (1, 1, 2, 2))
    assert not torch_refusals(lambda s, b, h, q, kv: torch.tanh(s / 2.0) * 2.0, (1, 1, 2, 2))
    assert not torch_refusals(lambda s, b, h, q, kv: s + torch.sin(q * 0.1), (1, 1, 2, 2))
