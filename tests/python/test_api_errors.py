"""Bad arguments get errors that name the argument and the fix (CPU: checks run before any GPU work)."""

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods


def qkv(shape=(1, 2, 8, 16), dtype=torch.float32, device="cpu"):
    return [torch.randn(shape, dtype=dtype, device=device) for _ in range(3)]


def test_bad_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        cudnn_flex.flex_attention(*qkv(), layout="bhds")


def test_not_4d():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q must be 4-D"):
        cudnn_flex.flex_attention(q[0], k, v)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        cudnn_flex.flex_attention(q, k.numpy(), v)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q is torch.float32 but v is torch.float64"):
        cudnn_flex.flex_attention(q, k, v.double())


def test_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q is on cpu but k is on meta"):
        cudnn_flex.flex_attention(q, k.to("meta"), v)


def test_gqa_ratio():
    q = torch.randn(1, 3, 8, 16)
    k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple"):
        cudnn_flex.flex_attention(q, k, v)


def test_batch_mismatch():
    q = torch.randn(2, 2, 8, 16)
    k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="same batch size"):
        cudnn_flex.flex_attention(q, k, v)


def test_head_dim_mismatch():
    q = torch.randn(1, 2, 8, 16)
    k = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="same head dim"):
        cudnn_flex.flex_attention(q, k, k)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", True])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        cudnn_flex.flex_attention(*qkv(), scale=scale)


def test_bprop_tensors_without_bprop():
    with pytest.raises(ValueError, match="score_mod_bprop_tensors were given without score_mod_bprop"):
        cudnn_flex.flex_attention(*qkv(), dsl_mods.causal, score_mod_bprop_tensors={"x": torch.ones(1)})


def test_bprop_without_score_mod():
    with pytest.raises(ValueError, match="score_mod_bprop was given without score_mod"):
        cudnn_flex.flex_attention(*qkv(), None, dsl_mods.causal)


def test_score_mod_tensor_not_broadcastable():
    with pytest.raises(ValueError, match=r"score_mod_tensors\['bias'\] has shape \(3, 8\)"):
        cudnn_flex.flex_attention(*qkv(), dsl_mods.add_bias, score_mod_tensors={"bias": torch.zeros(3, 8)})


def test_score_mod_tensor_requires_grad():
    with pytest.raises(ValueError, match=r"requires grad.*detach"):
        cudnn_flex.flex_attention(*qkv(), dsl_mods.add_bias, score_mod_tensors={"bias": torch.zeros(8, 8, requires_grad=True)})


def test_score_mod_tensor_not_a_tensor():
    with pytest.raises(TypeError, match="wrap numbers as torch.tensor"):
        cudnn_flex.flex_attention(*qkv(), dsl_mods.add_bias, score_mod_tensors={"bias": 1.0})


def test_score_mod_tensor_on_another_device():
    with pytest.raises(ValueError, match="is on meta but q is on cpu"):
        cudnn_flex.flex_attention(*qkv(), dsl_mods.add_bias, score_mod_tensors={"bias": torch.zeros(8, 8, device="meta")})


def test_cudnn_backend_on_cpu_is_refused():
    with pytest.raises(ValueError, match="backend='cudnn' needs CUDA float16/bfloat16"):
        cudnn_flex.flex_attention(*qkv(), backend="cudnn")


def test_module_rejects_bad_layout_at_construction():
    with pytest.raises(ValueError, match="layout must be one of"):
        cudnn_flex.FlexAttention(layout="nope")


def test_dict_in_the_bprop_position_is_explained():
    with pytest.raises(TypeError, match="score_mod_bprop must be a callable.*by keyword"):
        cudnn_flex.flex_attention(*qkv(), dsl_mods.add_bias, {"bias": torch.zeros(8, 8)})


def test_non_contiguous_head_dim_is_refused_for_cudnn():
    from cudnn_flex.api import _check_dense_last_dim

    q = torch.randn(1, 2, 8, 16).transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim strided
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"q's head dim is not contiguous.*q.contiguous\(\)"):
        _check_dense_last_dim(q, k, k)
    misaligned = torch.randn(1 * 2 * 8 * 16 + 1)[1:].view(1, 2, 8, 16)
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        _check_dense_last_dim(k, misaligned, k)
