"""cudnn_flex.compat.flex_attention against torch's own flex_attention on the CPU (forward and
lse; gradients against the formula written out in tests/python/oracle.py)."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import cudnn_flex
import oracle
from cudnn_flex.compat import flex_attention

B, H, H_KV, S, D = 2, 4, 2, 256, 16


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 40)


def softcap(score, b, h, q_idx, kv_idx):
    return torch.tanh(score / 20.0) * 20.0


def qkv(h_kv=H, s=S):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, s, D, generator=g, dtype=torch.float64),
            torch.randn(B, h_kv, s, D, generator=g, dtype=torch.float64),
            torch.randn(B, h_kv, s, D, generator=g, dtype=torch.float64))


def ours(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cudnn_flex.ReferencePathWarning)
        return flex_attention(*args, **kwargs)


@pytest.mark.parametrize("score_mod,mask,gqa", [(None, causal, False), (softcap, window, False),
                                                (softcap, None, True), (None, window, True)])
def test_matches_torch_flex_attention(score_mod, mask, gqa):
    q, k, v = qkv(H_KV if gqa else H)
    block_mask = create_block_mask(mask, None, None, S, S, device="cpu") if mask else None
    kw = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa, return_lse=True)
    out, lse = ours(q, k, v, kernel_options={"BLOCK_M": 64}, **kw)
    want, want_lse = torch_flex_attention(q, k, v, **kw)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse.double(), want_lse.double(), rtol=1e-6, atol=1e-6)


def test_gradients_match_the_formula():
    q, k, v = (t.requires_grad_() for t in qkv())
    block_mask = create_block_mask(window, B, None, S, S, device="cpu")
    out = ours(q, k, v, softcap, block_mask=block_mask)

    def formula(s, b, h, qi, kv):
        return torch.tanh(s / 20.0).mul(20.0).masked_fill(~window(b, h, qi, kv), oracle.NEG_INF)
    want, _ = oracle.attention(q, k, v, formula)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8)


def test_block_mask_from_kv_blocks_applies_its_block_table():
    """Without a mask_mod the block table is the mask (torch's compiled kernel; its eager CPU
    path ignores the table, so the expected value is the block-diagonal mask written out)."""
    q, k, v = qkv(s=256)
    dense = create_block_mask(causal, None, None, 256, 256, device="cpu")
    blocks = BlockMask.from_kv_blocks(dense.kv_num_blocks, dense.kv_indices)  # the diagonal blocks
    out = ours(q, k, v, block_mask=blocks)
    i = torch.arange(256)
    keep = (i[:, None] // 128) == (i[None, :] // 128)
    want, _ = oracle.attention(q, k, v, lambda s, *idx: s.masked_fill(~keep, oracle.NEG_INF))
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)


def test_errors_name_the_argument():
    q, k, v = qkv(H_KV)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        ours(q, k, v)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="Q_LEN=128"):
        ours(q, k, v, block_mask=create_block_mask(causal, None, None, 128, 128, device="cpu"))
    with pytest.raises(TypeError, match="must be a torch.nn.attention.flex_attention.BlockMask"):
        ours(q, k, v, block_mask=torch.ones(S, S, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="return_lse"):
        ours(q, k, v, return_aux=object())
