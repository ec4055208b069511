"""Torch-style score_mods and mask_mods, and automatic bprops, on the CPU.

Tracing is checked through validate_graphs (the bridge's printed op list for sm_90, no GPU);
numbers through the reference path against torch.nn.attention.flex_attention on the same mod.
"""

import re
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import cudnn_flex
from cudnn_flex import dsl_mods, mods, torch_style
from cudnn_flex.record_call import record_call as _record
from cudnn_flex.bprop_check import program_pair
from cudnn_flex.reference import RefTensor, ReferenceGraph

B, H, S, D = 2, 4, 48, 16
SLOPES = torch.rand(H)
BIAS_BH = torch.randn(B, H)
TABLE = torch.randn(H, S, S)
DOC = torch.tensor([0] * 20 + [1] * 16 + [2] * 12)


def qkv(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g, dtype=dtype) for _ in range(3))


def record(fn=None, mask=None, shape=(B, H, S, S)):
    """(program, slot tensors) of a call with these mods (what flex_attention records)."""
    q = torch.empty(shape[0], shape[1], shape[2], 8)
    program, tensors, _ = _record(fn, None, mask, None, None, q, shape[3])
    return program, tensors


def ops_of(text: str, which: int = 0) -> str:
    """The score_mod op list of the forward (0) or backward (1) graph printed by validate_graphs."""
    return re.findall(r"score_mod ops: (.*)", text)[which]


def validate(score_mod=None, mask_mod=None, **kw):
    q, k, v = (t.to(torch.float16) for t in qkv())
    return cudnn_flex.validate_graphs(q, k, v, score_mod, mask_mod=mask_mod, **kw)


# --- tracing: each construct becomes the expected DSL program --------------------------------

def softcap(score, b, h, q_idx, kv_idx):
    return torch.tanh(score / 20.0) * 20.0


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def bias_per_batch_head(score, b, h, q_idx, kv_idx):
    return score + BIAS_BH[b, h]


def table_bias(score, b, h, q_idx, kv_idx):
    return score + TABLE[h, q_idx, kv_idx]


def document(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


def where_and_cast(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, (q_idx - kv_idx).to(torch.float32) * 0.1)


HALF = torch.tensor(0.5)  # a captured one-element CPU tensor: passed by value


def tensor_scalar(score, b, h, q_idx, kv_idx):
    return score * HALF


def exp_log_chain(score, b, h, q_idx, kv_idx):
    return torch.log(torch.exp(score * 0.5) + 1.0)


@pytest.mark.parametrize("fn,mask,expected_fwd", [
    (softcap, None, "DIV TANH_FWD MUL"),
    (alibi, None, "GEN_INDEX GEN_INDEX SUB MUL ADD"),
    (bias_per_batch_head, None, "ADD"),
    (table_bias, None, "ADD"),
    (None, document, "GEN_INDEX MUL ADD CMP_EQ BINARY_SELECT"),
    (where_and_cast, None, "GEN_INDEX GEN_INDEX CMP_GE SUB MUL BINARY_SELECT"),
    (tensor_scalar, None, "MUL"),
    (exp_log_chain, None, "MUL EXP ADD LOG"),
    (None, mods.causal, "DIAGONAL_BAND_MASK"),  # a recognised band (masks/lower.py)
])
def test_tracing_emits_the_expected_program(fn, mask, expected_fwd):
    assert ops_of(validate(fn, mask)) == expected_fwd


def test_captured_tensors_become_strided_views_without_copies():
    assert record() == (None, [])
    _, (view,) = record(table_bias)
    assert view.shape == (1, H, S, S) and view.data_ptr() == TABLE.data_ptr()
    _, (view,) = record(alibi)
    assert view.shape == (1, H, 1, 1) and view.data_ptr() == SLOPES.data_ptr()
    _, tensors = record(None, document)
    assert sorted(tuple(t.shape) for t in tensors) == [(1, 1, 1, S), (1, 1, S, 1)]


def test_captured_tensor_values_are_inputs_not_keys():
    a, b = mods.alibi(torch.rand(H)), mods.alibi(torch.rand(H))
    assert record(a)[0].mod_id == record(b)[0].mod_id
    c, d = mods.softcap(20.0), mods.softcap(30.0)
    assert record(c)[0].mod_id != record(d)[0].mod_id


# --- unsupported constructs: named errors -------------------------------------------------------

def python_if(score, b, h, q_idx, kv_idx):
    if score > 0:
        return score
    return -score


def computed_index(score, b, h, q_idx, kv_idx):
    return score + SLOPES[(score * 0.0).to(torch.int32) + h]


def unsupported_function(score, b, h, q_idx, kv_idx):
    return torch.matmul(score, score)


def float_of_value(score, b, h, q_idx, kv_idx):
    return score * float(q_idx)


@pytest.mark.parametrize("fn,message", [
    (python_if, "Python control flow"),
    (computed_index, "computed from the score"),
    (unsupported_function, "torch function matmul"),
    (float_of_value, r"float\(\) of a traced value"),
])
def test_unsupported_constructs_name_themselves(fn, message):
    with pytest.raises(torch_style.UnsupportedConstruct, match=message):
        validate(fn)


def test_mask_mod_passed_as_score_mod_is_explained():
    with pytest.raises(TypeError, match="pass it as mask_mod="):
        validate(mods.causal)


def test_mask_mod_with_a_dsl_score_mod_is_explained():
    with pytest.raises(TypeError, match="combines with a torch-style score_mod"):
        validate(dsl_mods.relative_bias(), mods.causal)


# --- automatic bprop ------------------------------------------------------------------------------

def derived(fn):
    """The (forward, derived bprop) pair the library uses for a torch-style or DSL score_mod."""
    program, tensors = record(fn, shape=(2, 3, 16, 24))
    names = [f"t{i}" for i in range(len(tensors))]
    forward, backward = program_pair(program, names)
    return forward, backward, dict(zip(names, tensors))


def scale_times_score(graph, score, tensors):
    return graph.mul(score, 0.37)


@pytest.mark.parametrize("fn", [softcap, scale_times_score, exp_log_chain, mods.softcap(7.0),
                                mods.compose(mods.softcap(5.0), mods.masked(mods.sliding_window(5))),
                                where_and_cast, dsl_mods.softcap(9.0).forward,
                                mods.compose(lambda s, b, h, q, k: torch.sigmoid(s) * torch.sqrt(torch.abs(s) + 1.0))])
def test_derived_bprop_matches_autograd_of_the_reference(fn):
    forward, backward, tensors = derived(fn)
    err = cudnn_flex.check_score_mod_bprop(forward, backward, tensors, shape=(2, 3, 16, 24))
    assert err < 1e-9


def test_a_wrong_bprop_is_still_caught():
    forward, backward, _ = derived(softcap)

    def wrong(graph, d_p, tensors):
        return graph.mul(backward(graph, d_p, tensors), 2.0)

    with pytest.raises(cudnn_flex.BpropMismatchError):
        cudnn_flex.check_score_mod_bprop(forward, wrong, shape=(2, 3, 16, 24))


@pytest.mark.parametrize("fn,mask,needs_bprop", [
    (alibi, None, False), (table_bias, None, False), (None, document, False),
    (None, mods.causal, False), (None, mods.sliding_window(4), False),
    (mods.relative_bias(0.1), mods.prefix_lm(8), False), (dsl_mods.causal, None, False),
    (softcap, None, True), (scale_times_score, None, True), (where_and_cast, None, True),
])
def test_masks_and_biases_need_no_bprop(fn, mask, needs_bprop):
    text = validate(fn, mask)
    bwd_ops = ops_of(text, 1)
    fwd_ops = ops_of(text, 0)
    # The backward graph runs the score_mod again, then the padding mask of the partial tiles (these
    # lengths fill no tile), then the bprop's ops if there is one.
    padding = " GEN_INDEX CMP_LT BINARY_SELECT GEN_INDEX CMP_LT BINARY_SELECT"
    assert bwd_ops.startswith(fwd_ops + padding), (fwd_ops, bwd_ops)
    assert (bwd_ops != fwd_ops + padding) == needs_bprop, (fwd_ops, bwd_ops)


def test_underivable_op_is_reported_at_backward_not_forward():
    def uses_floor(score, b, h, q_idx, kv_idx):
        return score + torch.floor(score)  # floor has gradient 0: derivable

    validate(uses_floor)

    def pow_of_scores(graph, score, tensors):
        return graph.add(score, graph.gelu_backward(score, score))

    forward, backward, _ = derived(pow_of_scores)
    graph = ReferenceGraph((1, 1, 2, 2), torch.device("cpu"))
    forward(graph, RefTensor(torch.ones(1, 1, 2, 2), graph), {})
    with pytest.raises(cudnn_flex.BpropNotDerivable, match="gelu_backward"):
        backward(graph, RefTensor(torch.ones(1, 1, 2, 2), graph), {})


# --- numbers: the reference path against torch's flex_attention -----------------------------------

MOD_LIBRARY = {
    "causal": (None, mods.causal),
    "sliding_window": (None, mods.sliding_window(7)),
    "prefix_lm": (None, mods.prefix_lm(10)),
    "document_mask": (None, mods.document_mask(DOC)),
    "document_mask_batched": (None, mods.document_mask(torch.stack([DOC, DOC.flip(0)]))),
    "softcap": (mods.softcap(3.0), None),
    "alibi": (mods.alibi(SLOPES), None),
    "relative_bias": (mods.relative_bias(0.05), None),
    "softcap_sliding_window": (mods.softcap(3.0), mods.sliding_window(9)),
    "alibi_causal": (mods.alibi(SLOPES), mods.causal),
    "or_masks": (None, mods.or_masks(mods.prefix_lm(4), mods.sliding_window(3))),
    "and_masks": (None, mods.and_masks(mods.causal, mods.document_mask(DOC))),
    "composed": (mods.compose(mods.relative_bias(0.1), mods.softcap(2.0)), mods.causal),
    "table": (table_bias, None),
}


def torch_flex(q, k, v, score_mod, mask_mod):
    block_mask = create_block_mask(mask_mod, B, H, S, S, device=q.device) if mask_mod else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


@pytest.mark.parametrize("name", MOD_LIBRARY)
def test_reference_path_matches_torch_flex_attention(name):
    # torch's flex_attention has no CPU backward: gradients are compared on the GPU
    # (test_gpu_torch_style.py); here the reference's autograd is checked by gradcheck elsewhere.
    score_mod, mask_mod = MOD_LIBRARY[name]
    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cudnn_flex.ReferencePathWarning)
        got = cudnn_flex.flex_attention(q, k, v, score_mod, mask_mod=mask_mod)
    # 1e-5: torch adds a float32 bias term (slopes are float32) to float64 scores, the reference in float64.
    torch.testing.assert_close(got, torch_flex(q, k, v, score_mod, mask_mod), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MOD_LIBRARY)
def test_every_library_mod_builds_for_cudnn(name):
    score_mod, mask_mod = MOD_LIBRARY[name]
    assert "score_mod ops:" in validate(score_mod, mask_mod)
