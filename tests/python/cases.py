"""Case tables shared by the CPU and GPU tests: layouts and the broadcast patterns of score_mod
tensors. (The ready mods and their formulas are in mod_cases.py; the expected values in
oracle.py.) Nothing here runs a kernel, so CPU tests import it freely.
"""

from __future__ import annotations

import torch

# --- Layouts ---------------------------------------------------------------------------------

LAYOUTS = ("bhsd", "bshd", "sbhd")
# The permutation that views a tensor of `layout` as BHSD: t.permute(TO_BHSD[layout]) is BHSD.
TO_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3)}
# Its inverse: a BHSD tensor .permute(FROM_BHSD[layout]) is in `layout`.
FROM_BHSD = {name: tuple(sorted(range(4), key=lambda i: perm[i])) for name, perm in TO_BHSD.items()}


def shape_in(layout: str, b: int, h: int, s: int, d: int) -> tuple[int, int, int, int]:
    """The shape of a [B, H, S, D] tensor stored in `layout`."""
    return tuple((b, h, s, d)[i] for i in FROM_BHSD[layout])


def in_layout(bhsd: torch.Tensor, layout: str) -> torch.Tensor:
    """A BHSD tensor's values stored contiguously in `layout` (a copy)."""
    return bhsd.permute(FROM_BHSD[layout]).contiguous()


# --- Broadcast patterns of a score_mod tensor against the scores [B, H, Sq, Skv] ----------------

# A pattern says which of (B, H, Sq, Skv) the tensor has (True) or broadcasts (False, size 1).
ALL_PATTERNS = [tuple(bool(i >> (3 - j) & 1) for j in range(4)) for i in range(16)]


def pattern_name(mask) -> str:
    """'B11K' for a [B, 1, 1, Skv] tensor."""
    return "".join(c if keep else "1" for c, keep in zip("BHQK", mask))


def pattern_shape(mask, b: int, h: int, s_q: int, s_kv: int) -> list[int]:
    return [n if keep else 1 for keep, n in zip(mask, (b, h, s_q, s_kv))]


# cuDNN 9.19 computes wrong results for six patterns when their broadcast dims are described as
# size 1 (docs/broadcasting.md): every pattern that broadcasts over Sq but not over both B and Skv.
# cudnn-flex describes those at full size with stride 0 (what Tensor.expand does); the other ten
# keep their size-1 dims. Written out here, by name, as the tests expect it.
EXPANDED_PATTERNS = frozenset({"B111", "BH11", "111K", "1H1K", "B11K", "BH1K"})
