"""Fake kernels and autograd for torch.ops.cudnn_flex.{fwd,bwd} (the kernels themselves are C++)."""

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


def _setup_context(ctx, inputs, output):
    q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale, deterministic = inputs
    out, lse = output
    # Saving the score_mod tensors makes autograd's version check catch an in-place change of one
    # of them between forward and backward.
    ctx.save_for_backward(q, k, v, out, lse, *mod_tensors, *bprop_tensors)
    ctx.n_mod = len(mod_tensors)
    ctx.args = (mod_id, bprop_id, cacheable, scale, deterministic)
    # Unused outputs then arrive as None, so a gradient through lse can be told apart from none.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    if grad_lse is not None:
        raise NotImplementedError(
            "cudnn_flex: the backward pass does not propagate gradients through the returned lse; "
            "use lse.detach() in the loss")
    q, k, v, out, lse, *rest = ctx.saved_tensors
    mod_tensors, bprop_tensors = rest[:ctx.n_mod], rest[ctx.n_mod:]
    mod_id, bprop_id, cacheable, scale, deterministic = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.cudnn_flex.bwd(grad_out, q, k, v, out, lse, mod_tensors, bprop_tensors,
                                          mod_id, bprop_id, cacheable, scale, deterministic)
    # One entry per input, lists mirrored element-wise: nothing flows to the score_mod tensors.
    return dq, dk, dv, [None] * len(mod_tensors), [None] * len(bprop_tensors), None, None, None, None, None


torch.library.register_autograd("cudnn_flex::fwd", _backward, setup_context=_setup_context)
