"""flex_attention's seq_lens_q / seq_lens_kv (padded batches) on the CPU reference path: each batch
element gives what a call on its valid part alone gives (out, lse, dq, dk, dv); the padding gets
out 0, lse -inf and no gradient; the lengths are checked by name."""

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods

H, H_KV, D, D_V = 4, 2, 16, 8
LENGTHS = [(1, 1), (127, 129), (129, 127), (0, 5), (5, 0), (64, 133)]  # (q, kv) per batch element
S_Q, S_KV = 129, 133  # the padded lengths (unequal: a q bound checked against Skv would show)
SOFTCAP = dsl_mods.softcap(3.0)
MODS = {
    "none": {},
    "causal mask_mod": dict(mask_mod=mods.causal),
    "alibi torch-style": dict(score_mod=mods.alibi(mods.alibi_slopes(H))),
    "dsl softcap with its bprop": dict(score_mod=SOFTCAP.forward, score_mod_bprop=SOFTCAP.backward),
}


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(LENGTHS)
    q = torch.randn(b, H, S_Q, D, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(b, H_KV, S_KV, D, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(b, H_KV, S_KV, D_V, generator=g, dtype=torch.float64).requires_grad_()
    d_out = torch.randn(b, H, S_Q, D_V, generator=g, dtype=torch.float64)
    lengths_q = torch.tensor([n for n, _ in LENGTHS], dtype=torch.int32)
    lengths_kv = torch.tensor([n for _, n in LENGTHS], dtype=torch.int32)
    return q, k, v, d_out, lengths_q, lengths_kv


@pytest.mark.parametrize("mod", MODS)
def test_each_batch_element_is_its_valid_part_alone(mod):
    q, k, v, d_out, lengths_q, lengths_kv = inputs()
    out, lse = cudnn_flex.flex_attention(q, k, v, **MODS[mod], seq_lens_q=lengths_q, seq_lens_kv=lengths_kv,
                                         return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    for i, (n_q, n_kv) in enumerate(LENGTHS):
        qi, ki, vi = q[i:i + 1, :, :n_q], k[i:i + 1, :, :n_kv], v[i:i + 1, :, :n_kv]
        want, want_lse = cudnn_flex.flex_attention(qi, ki, vi, **MODS[mod], return_lse=True)
        grads = torch.autograd.grad(want, (qi, ki, vi), d_out[i:i + 1, :, :n_q], allow_unused=True)
        torch.testing.assert_close(out[i:i + 1, :, :n_q], want, msg=f"out of element {i}")
        torch.testing.assert_close(lse[i:i + 1, :, :n_q], want_lse, msg=f"lse of element {i}")
        # The gradients of the valid part: those of the element alone, read through its slices.
        for name, got, full, n in (("dq", grads[0], dq, n_q), ("dk", grads[1], dk, n_kv), ("dv", grads[2], dv, n_kv)):
            want_grad = torch.zeros_like(full[i:i + 1, :, :n]) if got is None else got
            torch.testing.assert_close(full[i:i + 1, :, :n], want_grad, msg=f"{name} of element {i}")
        # The padding: no output, an empty row's lse, and no gradient.
        assert torch.all(out[i, :, n_q:] == 0) and torch.all(lse[i, :, n_q:] == float("-inf"))
        assert torch.all(dq[i, :, n_q:] == 0) and torch.all(dk[i, :, n_kv:] == 0) and torch.all(dv[i, :, n_kv:] == 0)


def test_lengths_of_the_full_size_change_nothing():
    q, k, v, _, _, _ = inputs(seed=1)
    a = cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal)
    b = cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal,
                                  seq_lens_q=torch.full((len(LENGTHS),), S_Q, dtype=torch.int32),
                                  seq_lens_kv=torch.full((len(LENGTHS),), S_KV, dtype=torch.int32))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_in_the_padding_reaches_nothing(where):
    """Padding is often torch.empty: whatever it holds stays out of the valid rows and gradients."""
    q, k, v, d_out, lengths_q, lengths_kv = inputs(seed=2)
    clean = cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths_q, seq_lens_kv=lengths_kv)
    clean_grads = torch.autograd.grad(clean, (q, k, v), d_out)
    dirty = {"q": q.detach().clone(), "k": k.detach().clone(), "v": v.detach().clone()}
    lengths = lengths_q if where == "q" else lengths_kv
    for i, n in enumerate(lengths.tolist()):
        dirty[where][i, :, n:] = float("nan")
    qd, kd, vd = (dirty[n].requires_grad_() for n in ("q", "k", "v"))
    out = cudnn_flex.flex_attention(qd, kd, vd, seq_lens_q=lengths_q, seq_lens_kv=lengths_kv)
    grads = torch.autograd.grad(out, (qd, kd, vd), d_out)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    for a, b in zip(grads, clean_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_under_torch_compile_it_runs_and_matches_eager():
    q, k, v, _, lengths_q, lengths_kv = inputs(seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, lq, lkv: cudnn_flex.flex_attention(
        q, k, v, mask_mod=mods.causal, seq_lens_q=lq, seq_lens_kv=lkv), backend="eager")
    want = cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal, seq_lens_q=lengths_q, seq_lens_kv=lengths_kv)
    torch.testing.assert_close(compiled(q, k, v, lengths_q, lengths_kv), want, rtol=0, atol=0)


BAD = {
    "int64": (dict(seq_lens_kv=torch.zeros(len(LENGTHS), dtype=torch.int64)), ValueError,
              r"seq_lens_kv must be int32 \[B\] = \[6\]"),
    "one per head": (dict(seq_lens_q=torch.zeros(len(LENGTHS), H, dtype=torch.int32)), ValueError,
                     r"seq_lens_q must be int32 \[B\]"),
    "longer than the padding": (dict(seq_lens_q=torch.full((len(LENGTHS),), S_Q + 1, dtype=torch.int32)),
                                ValueError, r"seq_lens_q must lie in \[0, 129\]"),
    "keys longer than their padding": (dict(seq_lens_kv=torch.full((len(LENGTHS),), S_KV + 1, dtype=torch.int32)),
                                       ValueError, r"seq_lens_kv must lie in \[0, 133\]"),
    "negative": (dict(seq_lens_kv=torch.full((len(LENGTHS),), -1, dtype=torch.int32)), ValueError,
                 r"seq_lens_kv must lie in \[0, 133\]"),
    "a list": (dict(seq_lens_kv=[1, 2, 3, 4, 5, 6]), TypeError, r"seq_lens_kv must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_lengths_are_named(case):
    q, k, v, _, _, _ = inputs()
    kwargs, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        cudnn_flex.flex_attention(q, k, v, **kwargs)


def test_lengths_are_read_once_and_again_after_an_in_place_change(monkeypatch):
    """Reading lengths is a device sync: a lengths tensor every layer of a step passes is read
    once, and read again (and refused) after an in-place change makes it wrong."""
    q, k, v, _, lengths_q, lengths_kv = inputs(seed=4)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or tolist(t))
    for _ in range(3):
        cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths_q, seq_lens_kv=lengths_kv)
    assert sum(t is lengths_kv for t in reads) == 1 and sum(t is lengths_q for t in reads) == 1
    lengths_kv.fill_(S_KV + 1)
    with pytest.raises(ValueError, match=r"seq_lens_kv must lie in \[0, 133\]"):
        cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths_q, seq_lens_kv=lengths_kv)


def test_lengths_made_in_inference_mode_are_read_on_every_call(monkeypatch):
    """An inference tensor has no version counter: an in-place change could not be told, so its
    values are read (and checked) on every call instead of once."""
    q, k, v, _, lengths_q, lengths_kv = inputs(seed=5)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or tolist(t))
    with torch.inference_mode():
        lengths_kv = lengths_kv.clone()
        for _ in range(2):
            cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths_q, seq_lens_kv=lengths_kv)
        assert sum(t is lengths_kv for t in reads) == 2
        lengths_kv.fill_(S_KV + 1)
        with pytest.raises(ValueError, match=r"seq_lens_kv must lie in \[0, 133\]"):
            cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths_q, seq_lens_kv=lengths_kv)
