"""torch.nn.attention.flex_attention's calling convention on cudnn-flex.

    from cudnn_flex.compat import flex_attention   # instead of torch's

is all a model written for torch's flex_attention needs: the same arguments (score_mod,
block_mask, scale, enable_gqa, return_lse, kernel_options) and the same results.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import api


def _mask_of(block_mask, s_q: int, s_kv: int) -> Optional[Callable]:
    """The mask_mod that decides what a torch BlockMask lets through."""
    from torch.nn.attention.flex_attention import BlockMask, noop_mask
    if not isinstance(block_mask, BlockMask):
        raise TypeError("cudnn_flex: block_mask must be a torch.nn.attention.flex_attention.BlockMask "
                        f"(from create_block_mask), got {type(block_mask).__name__}")
    q_len, kv_len = block_mask.seq_lengths
    if (q_len, kv_len) != (s_q, s_kv):
        raise ValueError(f"cudnn_flex: block_mask was made for Q_LEN={q_len}, KV_LEN={kv_len}, but the "
                         f"inputs have Sq={s_q}, Skv={s_kv}; make it with create_block_mask(..., "
                         f"{s_q}, {s_kv})")
    if block_mask.mask_mod is not noop_mask:
        # create_block_mask derives the blocks from mask_mod, so mask_mod alone is the same mask
        # (cuDNN's tile skipping comes from recognising it, not from the block table).
        return block_mask.mask_mod
    # Blocks without a mask_mod (BlockMask.from_kv_blocks): the block table is the mask, as in
    # torch's compiled kernel (its eager CPU path applies the mask_mod alone and attends to all).
    # Materialised as a [Sq, Skv] tensor (a gather by q_idx // block), once per call.
    dense = block_mask.to_dense().to(torch.bool)  # [B, H, Sq / block, Skv / block]
    rows, cols = block_mask.BLOCK_SIZE

    def block_table(b, h, q_idx, kv_idx):
        return dense[b if dense.shape[0] > 1 else 0, h if dense.shape[1] > 1 else 0,
                     q_idx // rows, kv_idx // cols]
    return block_table


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   score_mod: Optional[Callable] = None, block_mask=None, scale: Optional[float] = None,
                   enable_gqa: bool = False, return_lse: bool = False, kernel_options: Optional[dict] = None,
                   *, return_aux=None):
    """torch.nn.attention.flex_attention, run by cudnn-flex.

    Args:
        query: [B, H_q, Sq, D]; key: [B, H_kv, Skv, D]; value: [B, H_kv, Skv, D_v] (CUDA fp16/bf16
            take cuDNN; other tensors the reference path).
        score_mod: score_mod(score, b, h, q_idx, kv_idx) -> score, as for torch.
        block_mask: a BlockMask from torch's create_block_mask (its mask_mod is applied) or
            BlockMask.from_kv_blocks (its block table is applied).
        scale: default 1/sqrt(D).
        enable_gqa: must be True when H_q != H_kv, as in torch.
        return_lse: also return the float32 log-sum-exp.
        kernel_options: accepted and ignored (they tune torch's Triton kernels).
        return_aux: not supported (use return_lse).
    Returns:
        out [B, H_q, Sq, D_v], and lse [B, H_q, Sq] with return_lse=True.
    """
    if return_aux is not None:
        raise NotImplementedError("cudnn_flex: return_aux is not supported; use return_lse=True")
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"cudnn_flex: kernel_options must be a dict (it is ignored), got "
                        f"{type(kernel_options).__name__}")
    if query.dim() == 4 and key.dim() == 4 and query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"cudnn_flex: query has {query.shape[1]} heads and key {key.shape[1]}; pass "
                         "enable_gqa=True for grouped-query attention (as torch's flex_attention asks)")
    mask_mod = None
    if block_mask is not None:
        mask_mod = _mask_of(block_mask, query.shape[-2], key.shape[-2])
    return api.flex_attention(query, key, value, score_mod, scale=scale, return_lse=return_lse,
                              mask_mod=mask_mod)
