"""Padded batches on cuDNN: flex_attention's seq_lens_q / seq_lens_kv as cuDNN's seq_len tensors.

cuDNN bounds its loops by the lengths (the tiles past them are skipped) and the padding mask the
op puts into the score_mod (csrc/score_mod_bridge.h) masks inside the last partial tile. The rows
past a query length are cuDNN's to leave as they are; this module gives them flex_attention's
contract: out 0, lse -inf, and (through torch.where's gradient) no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._validation import padded_lengths


def cudnn_seq_lens(seq_lens_q: Optional[torch.Tensor], seq_lens_kv: Optional[torch.Tensor],
                   q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
    """[seq_lens_q, seq_lens_kv] as the op takes them (checked; a missing one is the full length),
    or [] for an unpadded call."""
    checked = padded_lengths(seq_lens_q, seq_lens_kv, q, k)
    if checked is None:
        return []
    kv, q_lengths = checked
    full = lambda n: torch.full((q.shape[0],), n, dtype=torch.int32, device=q.device)  # noqa: E731
    return [(full(q.shape[2]) if q_lengths is None else q_lengths).contiguous(),
            (full(k.shape[2]) if kv is None else kv).contiguous()]


def without_padded_rows(out: torch.Tensor, lse: torch.Tensor, seq_lens_q: torch.Tensor,
                        seq_lens_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, Sq, D] and lse [B, H, Sq] with the rows past a query length, and every row of
    a batch element without keys, set to 0 and -inf."""
    rows = torch.arange(out.shape[2], device=out.device)
    valid = (rows < seq_lens_q[:, None]) & (seq_lens_kv[:, None] > 0)  # [B, Sq]
    out = torch.where(valid[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    lse = torch.where(valid[:, None, :], lse, torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device))
    return out, lse
