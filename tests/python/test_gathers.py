"""Gathers by a computed index in torch-style mods (the shapes of attention-gym's document mask
with offsets, Sandwich / learned relative positions and Graphormer), against the same mod run by
plain torch on broadcast index grids (tests/python/oracle.py)."""

import warnings

import pytest
import torch

import cudnn_flex
import oracle

B, H, SQ, SKV, D = 2, 3, 13, 13, 8
OFFSETS = torch.tensor([0, 5, 9, 13])
DOC = torch.repeat_interleave(torch.arange(3), OFFSETS[1:] - OFFSETS[:-1])
REL = torch.linspace(-1.0, 1.0, 2 * SKV - 1, dtype=torch.float64).to(torch.float32)
HEAD_SCALE = torch.tensor([0.5, 1.0, 2.0])
DIST = torch.randint(0, 4, (B, SQ, SKV), generator=torch.Generator().manual_seed(0))
SPATIAL = torch.tensor([[0.0, 0.5, -0.5, 1.0], [0.25, -1.0, 0.75, 0.0], [1.5, 0.0, -0.25, 0.5]])


def doc_causal_with_offsets(b, h, q_idx, kv_idx):
    same = DOC[q_idx] == DOC[kv_idx]
    q_local = q_idx - OFFSETS[DOC[q_idx]]
    kv_local = kv_idx - OFFSETS[DOC[kv_idx]]
    return same & (q_local >= kv_local)


def doc_start_interval(b, h, q_idx, kv_idx):
    return (kv_idx >= OFFSETS[DOC[q_idx]]) & (q_idx >= kv_idx)


def sandwich(score, b, h, q_idx, kv_idx):
    return score + REL[q_idx - kv_idx + (SKV - 1)] * HEAD_SCALE[h]


def graphormer(score, b, h, q_idx, kv_idx):
    return score + SPATIAL[h, DIST[b, q_idx, kv_idx]]


def first_row_bias(score, b, h, q_idx, kv_idx):
    return score + REL[q_idx * 0 + 3]  # a computed index that is a constant


def masked(mask):
    return lambda s, *idx: s.masked_fill(~mask(*idx), oracle.NEG_INF)


CASES = {
    "document_with_offsets": (None, doc_causal_with_offsets, masked(doc_causal_with_offsets)),
    "document_start_interval": (None, doc_start_interval, masked(doc_start_interval)),
    "sandwich": (sandwich, None, sandwich),
    "graphormer": (graphormer, None, graphormer),
    "constant_index": (first_row_bias, None, first_row_bias),
}


def qkv():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(B, H, s, D, generator=g, dtype=torch.float64).requires_grad_()
                 for s in (SQ, SKV, SKV))


@pytest.mark.parametrize("name", CASES)
def test_gather_matches_plain_torch(name):
    score_mod, mask_mod, formula = CASES[name]
    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cudnn_flex.ReferencePathWarning)
        out, lse = cudnn_flex.flex_attention(q, k, v, score_mod, mask_mod=mask_mod, return_lse=True)
    want, want_lse = oracle.attention(q, k, v, formula)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse.to(lse.dtype), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_new_gathered_values_reuse_the_program():
    from cudnn_flex.record_call import record_call as _record
    q = torch.empty(B, H, SQ, D)
    first, views, _ = _record(sandwich, None, None, None, None, q, SKV)
    REL.mul_(2.0)
    try:
        second, views2, _ = _record(sandwich, None, None, None, None, q, SKV)
    finally:
        REL.div_(2.0)
    assert first is second  # the gathered table is a runtime input
    assert not torch.equal(views[0], views2[0])


# The tensor of each case whose in-place change must show in the next call's gathered values.
READ = {"document_with_offsets": OFFSETS, "sandwich": REL, "graphormer": DIST}


@pytest.mark.parametrize("name", READ)
def test_a_gather_is_materialised_again_only_when_its_tensors_change(name, monkeypatch):
    from cudnn_flex import gather
    from cudnn_flex.record_call import record_call
    made = []
    real = gather._materialise
    monkeypatch.setattr(gather, "_materialise", lambda *args: made.append(1) or real(*args))
    score_mod, mask_mod, _ = CASES[name]
    q = torch.empty(B, H, SQ, D)
    call = lambda: record_call(score_mod, None, mask_mod, None, None, q, SKV)[1]  # noqa: E731
    changed = READ[name]
    changed.add_(0)  # a new version: what earlier tests gathered from it is not reused here
    first = call()
    n = len(made)
    assert n >= 1
    again = call()
    assert len(made) == n, "the same tensors at the same versions were gathered again (a copy per call)"
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    before = changed.clone()
    try:
        changed.copy_(changed.flip(-1) if name != "document_with_offsets" else torch.tensor([0, 2, 7, 13]))
        updated = call()
    finally:
        changed.copy_(before)
    assert len(made) > n
    assert any(not torch.equal(a, b) for a, b in zip(first, updated))


def test_gather_by_a_score_dependent_index_is_refused():
    def by_score(score, b, h, q_idx, kv_idx):
        return score + REL[(score * 0).to(torch.int32) + q_idx]

    q, k, v = qkv()
    with pytest.raises(cudnn_flex.UnsupportedConstruct, match="computed from the score"):
        cudnn_flex.flex_attention(q, k, v, by_score, backend="reference")


def test_a_slice_is_refused_by_name():
    def sliced(score, b, h, q_idx, kv_idx):
        return score + REL[1:][q_idx]

    q, k, v = qkv()
    out = cudnn_flex.flex_attention(q.detach(), k.detach(), v.detach(), sliced, backend="reference")
    want, _ = oracle.attention(q.detach(), k.detach(), v.detach(), sliced)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)

    def slice_inside(score, b, h, q_idx, kv_idx):
        return score + DIST[b, :, kv_idx].sum()

    with pytest.raises(cudnn_flex.UnsupportedConstruct, match="slice"):
        cudnn_flex.flex_attention(q, k, v, slice_inside, backend="reference")


def scaled_by_relative_table(score, b, h, q_idx, kv_idx):
    return score * REL[q_idx - kv_idx + (SKV - 1)]  # the backward saves the gathered tensor itself


def test_a_gather_made_in_inference_mode_is_not_reused_under_autograd():
    q, k, v = (t.detach().float().requires_grad_() for t in qkv())  # float32: the table's dtype, no copy
    with torch.inference_mode():
        cudnn_flex.flex_attention(q.detach(), k.detach(), v.detach(), scaled_by_relative_table, backend="reference")
    out = cudnn_flex.flex_attention(q, k, v, scaled_by_relative_table, backend="reference")
    out.sum().backward()  # an inference tensor saved for backward would raise here
    want, _ = oracle.attention(q.detach(), k.detach(), v.detach(), scaled_by_relative_table)
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
