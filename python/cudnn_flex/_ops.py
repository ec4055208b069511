"""Fake kernels for torch.ops.cudnn_flex.{fwd,bwd}: shapes and strides without running anything.

The CUDA kernels and the autograd of fwd (csrc/autograd.cpp) are C++."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)


def strides_like(like: torch.Tensor, sizes) -> list[int]:
    """Strides of a new tensor of `sizes` in the dimension order of `like` (mirrors ops.cpp)."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # stable: ties keep order
    strides = [0] * like.dim()
    running = 1
    for d in reversed(order):
        strides[d] = running
        running *= sizes[d]
    return strides


def _empty_like_layout(like: torch.Tensor, sizes, dtype=None) -> torch.Tensor:
    return like.new_empty_strided(tuple(sizes), strides_like(like, sizes), dtype=dtype or like.dtype)


@torch.library.register_fake("cudnn_flex::fwd")
def _fwd_fake(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale, deterministic):
    out = _empty_like_layout(q, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("cudnn_flex::bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale,
              deterministic):
    return (_empty_like_layout(q, q.shape), _empty_like_layout(k, k.shape), _empty_like_layout(v, v.shape))
