"""The reference path (the score_mod DSL on torch) against hand-written formulas, on the CPU."""

import math
import warnings

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods, reference

TO_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3)}


def manual_attention(q, k, v, score_fn):
    """softmax(score_fn(scale * q k^T)) v on BHSD float64 tensors, GQA by repeating heads."""
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    b_idx, h_idx, q_idx, kv_idx = torch.meshgrid(*(torch.arange(n) for n in s.shape), indexing="ij")
    s = score_fn(s, b_idx, h_idx, q_idx, kv_idx)
    return torch.softmax(s, dim=-1) @ v


H = 4
SLOPES = mods.alibi_slopes(H, dtype=torch.float64).flatten()
CASES = {
    "causal": (dict(score_mod=dsl_mods.causal),
               lambda s, b, h, q, kv: s.masked_fill(q < kv, float("-inf"))),
    "softcap": (dict(score_mod=dsl_mods.softcap(2.0).forward), lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0)),
    "relative_bias": (dict(score_mod=dsl_mods.relative_bias()), lambda s, b, h, q, kv: s + (q - kv)),
    "alibi": (dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": SLOPES.view(1, H, 1, 1)}),
              lambda s, b, h, q, kv: s + SLOPES[h] * (kv - q)),
    "sliding_window": (dict(score_mod=dsl_mods.sliding_window(3)),
                       lambda s, b, h, q, kv: s.masked_fill((q < kv) | (q - kv >= 3), float("-inf"))),
}


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "sbhd"])
@pytest.mark.parametrize("h_kv", [H, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_hand_written_formula(case, h_kv, layout):
    kwargs, formula = CASES[case]
    g = torch.Generator().manual_seed(0)
    b, s_q, d = 2, 12, 16
    q = torch.randn(b, H, s_q, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, s_q, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, s_q, d, generator=g, dtype=torch.float64)
    inv = tuple(sorted(range(4), key=lambda i: TO_BHSD[layout][i]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cudnn_flex.ReferencePathWarning)
        out = cudnn_flex.flex_attention(*(t.permute(inv) for t in (q, k, v)), layout=layout, **kwargs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.permute(TO_BHSD[layout]), manual_attention(q, k, v, formula))


def test_gradients_match_finite_differences():
    cap = dsl_mods.softcap(1.5)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    slopes = torch.rand(1, 2, 1, 1, generator=g, dtype=torch.float64)

    def fn(q, k, v):
        def mod(graph, score, tensors):
            return dsl_mods.alibi(graph, cap.forward(graph, dsl_mods.causal(graph, score, tensors), tensors), tensors)
        out, lse = reference.attention(q, k, v, mod, {"slopes": slopes}, float_dtype=torch.float64)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fully_masked_rows_give_zero_and_minus_inf_lse():
    def mask_all(graph, score, tensors):
        return graph.binary_select(score, float("-inf"), graph.cmp_lt(graph.gen_index(score, 3), 0))

    q = torch.randn(1, 1, 3, 4)
    out, lse = reference.attention(q, q, q, mask_all)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()


def test_reference_path_warns_once_with_its_own_category(monkeypatch):
    monkeypatch.setattr(cudnn_flex.api, "_warned", set())
    q = torch.randn(1, 1, 4, 8)
    with pytest.warns(cudnn_flex.ReferencePathWarning, match="reference path"):
        cudnn_flex.flex_attention(q, q, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cudnn_flex.flex_attention(q, q, q)


def test_backend_reference_and_lse():
    q = torch.randn(1, 2, 4, 8)
    out, lse = cudnn_flex.flex_attention(q, q, q, backend="reference", return_lse=True)
    scores = q @ q.transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    with pytest.raises(ValueError, match="backend must be"):
        cudnn_flex.flex_attention(q, q, q, backend="triton")


def test_bprop_checker_accepts_the_right_softcap_bprop():
    cap = dsl_mods.softcap(2.0)
    assert cudnn_flex.check_score_mod_bprop(cap.forward, cap.backward) < 1e-12


def test_bprop_checker_rejects_a_bprop_missing_the_one_over_cap_factor():
    cap = dsl_mods.softcap(2.0)

    def missing_div(graph, d_p, tensors):  # (dP * cap) * tanh'(s / cap) without the final / cap
        return graph.tanh_backward(graph.mul(d_p, cap.cap), cap._before_tanh)

    with pytest.raises(cudnn_flex.BpropMismatchError, match=r"at \(b, h, q, kv\) = \(0, 0, 0, 0\): bprop gave"):
        cudnn_flex.check_score_mod_bprop(cap.forward, missing_div)


def test_bprop_checker_identity_is_right_for_masks_and_biases_only():
    identity = lambda graph, d_p, tensors: d_p  # noqa: E731
    slopes = torch.rand(1, 3, 1, 1)
    assert cudnn_flex.check_score_mod_bprop(dsl_mods.causal, identity) == 0.0
    assert cudnn_flex.check_score_mod_bprop(dsl_mods.alibi, identity, {"slopes": slopes}) == 0.0
    with pytest.raises(cudnn_flex.BpropMismatchError):
        cudnn_flex.check_score_mod_bprop(lambda g, s, t: s * 0.5, identity)


def test_every_dsl_op_exists_on_both_graphs():
    bridge_ops = {n for n in dir(cudnn_flex.Graph) if not n.startswith("_")}
    reference_ops = {n for n in dir(reference.ReferenceGraph) if not n.startswith("_")}
    assert bridge_ops <= reference_ops, f"missing on the reference: {bridge_ops - reference_ops}"
