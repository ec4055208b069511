"""Padded batches on cuDNN: flex_attention's seq_lens_q / seq_lens_kv as cuDNN's seq_len tensors.

cuDNN bounds its loops by the lengths (the tiles past them are skipped) and the padding mask the
op puts into the score_mod (csrc/score_mod_bridge.h) masks inside the last partial tile, where a
row past its query length is fully masked (out 0, lse -inf, as cuDNN gives such rows). The op
zero-fills out (lse -inf) and the gradients before cuDNN runs, so the rows and keys in skipped
tiles get flex_attention's contract too: out 0, lse -inf, no gradient. Its forward skips that
where the lengths' values, read on the host, leave no row unwritten: every query row inside its
sequence and with a key (a decode step over a KV cache), but under CUDA graph capture.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._validation import padded_lengths


def cudnn_seq_lens(seq_lens_q: Optional[torch.Tensor], seq_lens_kv: Optional[torch.Tensor],
                   q: torch.Tensor, k: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """([seq_lens_q, seq_lens_kv] as the op takes them (checked; a missing one is the full
    length), or [] for an unpadded call; whether every query row attends, which spares the op's
    forward its clearing of out and lse: PaddedLengths.every_row_attends)."""
    checked = padded_lengths(seq_lens_q, seq_lens_kv, q, k)
    if checked is None:
        return [], False
    return [t.contiguous() for t in completed_lengths(checked.q, checked.kv, q, k)], checked.every_row_attends


def completed_lengths(seq_lens_q: Optional[torch.Tensor], seq_lens_kv: Optional[torch.Tensor],
                      q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
    """[seq_lens_q, seq_lens_kv], a side not given as its full length."""
    return [full_lengths(q.shape[0], q.shape[2], q.device) if seq_lens_q is None else seq_lens_q,
            full_lengths(q.shape[0], k.shape[2], q.device) if seq_lens_kv is None else seq_lens_kv]


# (device, batch, length) -> int32 [batch] of that length: the side a padded call leaves out (a
# decode step gives seq_lens_kv only). Made once, complete before any stream reads it, never
# written, and kept for the process: a CUDA graph captured over a call reads it at each replay, so
# it is never freed (not by clear_cache() either). Past _MAX_FULL_LENGTHS each call makes its own.
_kept_lengths: dict = {}
_MAX_FULL_LENGTHS = 256


def full_lengths(batch: int, length: int, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # an op of the compiled graph
        return torch.full((batch,), length, dtype=torch.int32, device=device)
    key = (device, batch, length)
    kept = _kept_lengths.get(key)
    if kept is not None:
        return kept
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    with torch.inference_mode(False):  # a later call with autograd may save it for its backward
        made = torch.full((batch,), length, dtype=torch.int32, device=device)
    if capturing or type(made) is not torch.Tensor or len(_kept_lengths) >= _MAX_FULL_LENGTHS:
        # A capture cannot wait for its fill; under a mode (FakeTensorMode for a shape estimate)
        # torch.full makes no real tensor.
        return made
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # another stream may read it next
    # (another thread may have kept one meanwhile, the synchronize letting it run: one is kept)
    return _kept_lengths.setdefault(key, made)


def is_kept(lengths: torch.Tensor, length: int) -> bool:
    """Whether lengths is the full side of `length` full_lengths keeps (never written, alive for
    the process), not one it made for a single call (under a capture, or past _MAX_FULL_LENGTHS).
    (Looked up, not scanned: another thread may add to the table meanwhile.)"""
    return _kept_lengths.get((lengths.device, lengths.shape[0], length)) is lengths
