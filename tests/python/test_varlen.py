"""flex_attention_varlen on the CPU reference path: packed sequences give what one
flex_attention call per sequence gives (out, lse and the three gradients), with b the sequence
number and q_idx/kv_idx positions within it; its arguments are checked by name."""

import numpy as np
import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods
from length_mods import cu_seqlens

H, H_KV, D, D_V = 4, 2, 16, 8




def packed(lengths_q, lengths_kv, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), H, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(sum(lengths_kv), H_KV, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(sum(lengths_kv), H_KV, D_V, generator=g, dtype=dtype).requires_grad_()
    d_out = torch.randn(sum(lengths_q), H, D_V, generator=g, dtype=dtype)
    return q, k, v, d_out


def one_call_per_sequence(q, k, v, d_out, lengths_q, lengths_kv, mods_of):
    """out [total_q, H, D_v], lse [H, total_q] and the gradients from flex_attention on each
    sequence alone (layout "sbhd" with B = 1: views of the packed tensors, no copies)."""
    outs, lses = [], []
    sq, skv = [0], [0]
    for n_q, n_kv in zip(lengths_q, lengths_kv):
        sq.append(sq[-1] + n_q)
        skv.append(skv[-1] + n_kv)
    for i, (n_q, n_kv) in enumerate(zip(lengths_q, lengths_kv)):
        qi, ki, vi = (t[a:b].unsqueeze(1) for t, a, b in ((q, sq[i], sq[i + 1]), (k, skv[i], skv[i + 1]),
                                                              (v, skv[i], skv[i + 1])))
        out, lse = cudnn_flex.flex_attention(qi, ki, vi, **mods_of(i), layout="sbhd", return_lse=True)
        outs.append(out[:, 0])
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    return out.detach(), lse, grads


def varlen(q, k, v, d_out, lengths_q, lengths_kv, **kwargs):
    out, lse = cudnn_flex.flex_attention_varlen(q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_kv),
                                                return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    return out.detach(), lse, grads


SLOPES = mods.alibi_slopes(H)
SOFTCAP = dsl_mods.softcap(3.0)
MODS = {
    "none": {},
    "causal mask_mod": dict(mask_mod=mods.causal),
    "alibi + sliding window": dict(score_mod=mods.alibi(SLOPES), mask_mod=mods.sliding_window(9)),
    "dsl softcap with its bprop": dict(score_mod=SOFTCAP.forward, score_mod_bprop=SOFTCAP.backward),
    "dsl bias per head": dict(score_mod=dsl_mods.add_bias,
                              score_mod_tensors={"bias": torch.linspace(-1, 1, H).view(1, H, 1, 1)}),
}
LENGTHS = {
    "tile edges": ([1, 127, 129], [1, 127, 129]),
    "cross lengths": ([5, 40, 3], [17, 9, 60]),
    "empty sequences": ([0, 6, 4, 0], [3, 0, 7, 0]),
    "one length (a batch: no copies)": ([33, 33, 33], [129, 129, 129]),
}


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("mod", MODS)
def test_packed_sequences_match_one_call_per_sequence(mod, lengths):
    lengths_q, lengths_kv = LENGTHS[lengths]
    q, k, v, d_out = packed(lengths_q, lengths_kv)
    got = varlen(q, k, v, d_out, lengths_q, lengths_kv, **MODS[mod])
    want = one_call_per_sequence(q, k, v, d_out, lengths_q, lengths_kv, lambda i: MODS[mod])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_b_is_the_sequence_number():
    lengths = [7, 12, 5]
    temperatures = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    q, k, v, d_out = packed(lengths, lengths, seed=3)
    got = varlen(q, k, v, d_out, lengths, lengths, score_mod=lambda s, b, h, q_idx, kv_idx: s * temperatures[b])
    want = one_call_per_sequence(q, k, v, d_out, lengths, lengths,
                                 lambda i: dict(scale=float(temperatures[i]) / D ** 0.5))
    torch.testing.assert_close(got[0], want[0])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b)


def test_a_larger_max_seqlen_changes_nothing():
    lengths = [4, 9]
    q, k, v, d_out = packed(lengths, lengths, seed=4)
    a = cudnn_flex.flex_attention_varlen(q, k, v, cu_seqlens(lengths), cu_seqlens(lengths), mask_mod=mods.causal)
    b = cudnn_flex.flex_attention_varlen(q, k, v, cu_seqlens(lengths), cu_seqlens(lengths), mask_mod=mods.causal,
                                         max_seqlen_q=32, max_seqlen_kv=20)
    torch.testing.assert_close(a, b)  # the same up to summation order


@pytest.mark.parametrize("also_causal", [False, True])
def test_document_ids_give_the_document_mask(also_causal):
    """A torch flex user's packed row with a document mask, and the same row as packed sequences."""
    doc = torch.tensor([0] * 5 + [1] * 7 + [2] * 1 + [3] * 11)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, H, doc.numel(), D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = mods.document_mask(doc)
    if also_causal:
        mask = mods.and_masks(mask, mods.causal)
    want = cudnn_flex.flex_attention(q, k, v, mask_mod=mask)[0].transpose(0, 1)
    cu = cudnn_flex.cu_seqlens_from_document_ids(doc)
    assert cu.tolist() == [0, 5, 12, 13, 24]
    got = cudnn_flex.flex_attention_varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, cu,
                                           mask_mod=mods.causal if also_causal else None)
    torch.testing.assert_close(got, want)


def test_a_document_split_in_parts_is_refused_not_misread():
    # document_mask lets the last token see the first two; as packed sequences it would be alone.
    with pytest.raises(ValueError, match=r"each document's tokens must be contiguous .*runs \[0, 1, 0\]"):
        cudnn_flex.cu_seqlens_from_document_ids(torch.tensor([0, 0, 1, 0]))


def test_max_seqlen_takes_any_integer():
    lengths = [4, 9]
    q, k, v, _ = packed(lengths, lengths, seed=6)
    a = cudnn_flex.flex_attention_varlen(q, k, v, cu_seqlens(lengths), cu_seqlens(lengths))
    b = cudnn_flex.flex_attention_varlen(q, k, v, cu_seqlens(lengths), cu_seqlens(lengths),
                                         max_seqlen_q=torch.tensor(9), max_seqlen_kv=np.int64(12))
    torch.testing.assert_close(a, b)


def good_args():
    lengths = [3, 4]
    q, k, v, _ = packed(lengths, lengths)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens(lengths), cu_seqlens_kv=cu_seqlens(lengths))


BAD = {
    "int64 lengths": (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), ValueError, r"cu_seqlens_q must be int32"),
    "not from 0": (dict(cu_seqlens_kv=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError,
                   r"cu_seqlens_kv must start at 0"),
    "decreasing": (dict(cu_seqlens_q=torch.tensor([0, 5, 4, 7], dtype=torch.int32)), ValueError,
                   r"cu_seqlens_q must not decrease"),
    "wrong total": (dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
                    r"cu_seqlens_q ends at 6 but q has 7 tokens"),
    "2-D lengths": (dict(cu_seqlens_q=torch.tensor([[0, 3, 7]], dtype=torch.int32)), ValueError,
                    r"cu_seqlens_q must be 1-D"),
    "other counts": (dict(cu_seqlens_kv=torch.tensor([0, 7], dtype=torch.int32)), ValueError,
                     r"cu_seqlens_q describes 2 sequences but cu_seqlens_kv 1"),
    "4-D q": (dict(q=torch.zeros(1, 7, H, D)), ValueError, r"q must be 3-D \[total tokens, heads, head dim\]"),
    "heads": (dict(k=torch.zeros(7, 3, D, dtype=torch.float64)), ValueError, r"one head count"),
    "max too small": (dict(max_seqlen_q=3), ValueError, r"max_seqlen_q must be an int at least the longest "
                                                         r"sequence \(4\)"),
    "max a float": (dict(max_seqlen_kv=4.0), ValueError, r"max_seqlen_kv must be an int"),
    "not a tensor": (dict(cu_seqlens_kv=[0, 3, 7]), TypeError, r"cu_seqlens_kv must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_are_named(case):
    change, exc, match = BAD[case]
    args = {**good_args(), **change}
    with pytest.raises(exc, match=match):
        cudnn_flex.flex_attention_varlen(**args)


def test_packed_documents_match_torch_flex_attention():
    """Against torch's own flex_attention (not this library's reference): a packed row of documents
    with a causal document mask, and the same row as packed sequences (out and lse)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention
    doc = torch.tensor([0] * 5 + [1] * 60 + [2] * 1 + [3] * 62)  # 128 tokens
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, H, doc.numel(), D, generator=g, dtype=torch.float64) for _ in range(3))

    def causal_document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    block_mask = create_block_mask(causal_document, None, None, doc.numel(), doc.numel(), device="cpu")
    want, want_lse = torch_flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
    cu = cudnn_flex.cu_seqlens_from_document_ids(doc)
    got, lse = cudnn_flex.flex_attention_varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, cu,
                                                mask_mod=mods.causal, return_lse=True)
    torch.testing.assert_close(got, want[0].transpose(0, 1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse.double(), want_lse[0].double(), rtol=1e-6, atol=1e-6)


def test_with_max_seqlen_given_cu_seqlens_are_read_once(monkeypatch):
    """Each host read is a device sync: with max_seqlen_q/kv given, a model's layers share one
    check of the cu_seqlens tensors; a wrong max_seqlen is still caught."""
    lengths = [3, 0, 5]
    q, k, v, _ = packed(lengths, lengths, seed=2)
    cu_q, cu_kv = cu_seqlens(lengths), cu_seqlens(lengths)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or tolist(t))
    outs = [cudnn_flex.flex_attention_varlen(q, k, v, cu_q, cu_kv, max_seqlen_q=5, max_seqlen_kv=5)
            for _ in range(3)]
    assert sum(t is cu_q for t in reads) == 1 and sum(t is cu_kv for t in reads) == 1
    assert len(reads) == 4  # and the two lengths tensors made from them, checked once too
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"max_seqlen_q must be an int at least the longest sequence \(5\)"):
        cudnn_flex.flex_attention_varlen(q, k, v, cu_q, cu_kv, max_seqlen_q=4, max_seqlen_kv=5)


def test_what_is_kept_per_cu_seqlens_goes_with_it():
    """Lengths and row indices made from a cu_seqlens tensor are kept while it lives (one host
    read per version), and dropped with it: a new cu_seqlens each step leaks nothing."""
    from cudnn_flex import _validation
    lengths = [3, 0, 5]
    q, k, v, _ = packed(lengths, lengths, seed=3)
    before = len(_validation._per_version)
    for _ in range(5):
        cu = cu_seqlens(lengths)
        cudnn_flex.flex_attention_varlen(q, k, v, cu, cu.clone(), max_seqlen_q=5, max_seqlen_kv=5)
        del cu
    assert len(_validation._per_version) <= before
