"""Padded batches on cuDNN: flex_attention's seq_lens_q / seq_lens_kv as cuDNN's seq_len tensors.

cuDNN bounds its loops by the lengths (the tiles past them are skipped) and the padding mask the
op puts into the score_mod (csrc/score_mod_bridge.h) masks inside the last partial tile, where a
row past its query length is fully masked (out 0, lse -inf, as cuDNN gives such rows). The op
zero-fills out (lse -inf) and the gradients before cuDNN runs, so the rows and keys in skipped
tiles get flex_attention's contract too: out 0, lse -inf, no gradient.
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
