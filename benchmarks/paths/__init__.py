"""How each framework runs a case: one module per path, each with na_reason(case) (why it cannot
express a case, or None) and a runner (q, k, v) -> out built outside any timing.

Paths, all on the same q, k, v in one process:
  cudnn_flex       this library (ours.py): cudnn_flex.flex_attention, mods written as a user would
  frontend         the cuDNN frontend Python graph path of the reference PR (frontend.py)
  frontend_native  the same, with cuDNN's native masks (diagonal band, padding) instead of a score_mod
  sdpa_cudnn       torch F.scaled_dot_product_attention, cuDNN backend (sdpa.py)
  sdpa_flash       the same, flash backend
  torch_flex       torch flex_attention under torch.compile, with BlockMasks (torch_flex.py)

Framework imports (cudnn_flex, cudnn, torch's flex_attention) happen when a runner is built, so
that this package imports without a GPU and a path that fails to import fails only its own rows.
"""

from __future__ import annotations

from typing import Callable, Optional

from . import frontend, ours, sdpa, torch_flex

PATHS = ("cudnn_flex", "frontend", "frontend_native", "sdpa_cudnn", "sdpa_flash", "torch_flex")
PATH_LABELS = {
    "cudnn_flex": "cudnn-flex (this library)",
    "frontend": "cuDNN frontend Python graph (reference PR path)",
    "frontend_native": "cuDNN frontend Python graph, native masks (diagonal band, padding mask)",
    "sdpa_cudnn": "torch SDPA, cuDNN backend",
    "sdpa_flash": "torch SDPA, flash backend",
    "torch_flex": "torch flex_attention under torch.compile",
}


def na_reason(case: str, path: str) -> Optional[str]:
    """Why `path` cannot express `case` (the report's n/a), or None when it can."""
    if path == "cudnn_flex":
        return ours.na_reason(case)
    if path in ("frontend", "frontend_native"):
        return frontend.na_reason(case, native=(path == "frontend_native"))
    if path in ("sdpa_cudnn", "sdpa_flash"):
        return sdpa.na_reason(case)
    if path == "torch_flex":
        return torch_flex.na_reason(case)
    raise ValueError(path)


def paths_for(case: str) -> tuple:
    """The paths that can express `case`, in PATHS order."""
    return tuple(p for p in PATHS if na_reason(case, p) is None)


def make_runner(case: str, path: str, inputs: dict, args) -> Callable:
    """A function (q, k, v) -> out for one case on one path. Setup (block masks, mod objects,
    frontend graphs' keys) happens here, outside any timing."""
    if path == "cudnn_flex":
        return ours.runner(case, inputs)
    if path in ("sdpa_cudnn", "sdpa_flash"):
        return sdpa.runner(case, inputs, flash=(path == "sdpa_flash"))
    if path == "torch_flex":
        return torch_flex.runner(case, inputs, args.flex_compile)
    if path in ("frontend", "frontend_native"):
        return frontend.runner(case, inputs, native=(path == "frontend_native"))
    raise ValueError(path)
