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
    from cudnn_flex._validation import check_dense_last_dim as _check_dense_last_dim

    q = torch.randn(1, 2, 8, 16).transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim strided
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"q's head dim is not contiguous.*q.contiguous\(\)"):
        _check_dense_last_dim(q, k, k)
    misaligned = torch.randn(1 * 2 * 8 * 16 + 1)[1:].view(1, 2, 8, 16)
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        _check_dense_last_dim(k, misaligned, k)


# --- every other refusal of flex_attention's checks: its type, and a message naming the argument ---

def _q_k_v(b=1, h_q=2, h_k=2, h_v=2, s_q=8, s_k=8, s_v=8, d=16, d_k=16, d_v=16):
    return (torch.randn(b, h_q, s_q, d), torch.randn(b, h_k, s_k, d_k), torch.randn(b, h_v, s_v, d_v))


def _ignore_self(score, b, h, q_idx, kv_idx):
    return score


BIAS = torch.zeros(8, 8)


@pytest.mark.parametrize("args,kwargs,error,message", [
    (_q_k_v(h_k=2, h_v=1), {}, ValueError, r"k and v must have the same number of heads .*k \(1, 2, 8, 16\), v \(1, 1, 8, 16\)"),
    (_q_k_v(h_k=0, h_v=0), {}, ValueError, r"the number of query heads \(2\) must be a multiple of the number of key/value heads \(0\)"),
    (_q_k_v(s_k=8, s_v=7), {}, ValueError, r"k and v must have the same sequence length .*v \(1, 2, 7, 16\)"),
    (_q_k_v(d=0, d_k=0), {}, ValueError, r"q and k have head dim 0"),
    (qkv() + [3], {}, TypeError, r"score_mod must be a callable .*got int"),
    # the factory of a ready DSL mod passed where an instance belongs (its old function form)
    (qkv() + [dsl_mods.relative_bias], {}, TypeError, r"score_mod is the class RelativeBias; pass an instance"),
    (qkv(), dict(score_mod_tensors={"bias": BIAS}), ValueError, r"score_mod_tensors were given without score_mod"),
    (qkv() + [dsl_mods.add_bias, None, [BIAS]], {}, TypeError, r"score_mod_tensors must be a dict .*got list"),
    (qkv() + [dsl_mods.add_bias, None, {1: BIAS}], {}, TypeError, r"the keys of score_mod_tensors must be str, got int"),
    (qkv() + [dsl_mods.add_bias, None, {"bias": BIAS.to(torch.complex64)}], {}, ValueError,
     r"score_mod_tensors\['bias'\] has dtype torch.complex64"),
    (qkv() + [dsl_mods.add_bias, None, {"bias": BIAS.to(torch.int16)}], {}, ValueError,
     r"score_mod_tensors\['bias'\] has dtype torch.int16"),
    (qkv() + [dsl_mods.add_bias, None, {"bias": torch.zeros(1, 1, 1, 8, 8)}], {}, ValueError,
     r"score_mod_tensors\['bias'\] has shape \(1, 1, 1, 8, 8\), which does not broadcast"),
    (qkv() + [dsl_mods.add_bias, None, {"bias": torch.zeros(8, 7)}], {}, ValueError,
     r"score_mod_tensors\['bias'\] has shape \(8, 7\), which does not broadcast .*\[1, 2, 8, 8\]"),
    (qkv() + [dsl_mods.softcap(2.0).forward, dsl_mods.softcap(2.0).backward, None, {"x": torch.zeros(8, 8, requires_grad=True)}],
     {}, ValueError, r"score_mod_bprop_tensors\['x'\] requires grad"),
    (qkv(), dict(mask_mod=3), TypeError, r"mask_mod must be a callable .*got int"),
    (qkv(), dict(mask_mod=lambda b, h, q_idx: q_idx >= 0), TypeError, r"mask_mod must take \(b, h, q_idx, kv_idx\)"),
    (qkv() + [_ignore_self, None, {"bias": BIAS}], {}, TypeError,
     r"a torch-style score_mod gets its tensors by capturing them .*not through score_mod_tensors"),
    (qkv(), dict(backend="cuda"), ValueError, r"backend must be 'auto', 'cudnn' or 'reference', got 'cuda'"),
])
def test_refusal_names_the_argument(args, kwargs, error, message):
    with pytest.raises(error, match=r"^cudnn_flex: " + message):
        cudnn_flex.flex_attention(*args, **kwargs)


def test_validate_graphs_runs_the_same_checks():
    with pytest.raises(ValueError, match=r"^cudnn_flex: k and v must have the same sequence length"):
        cudnn_flex.validate_graphs(*_q_k_v(s_k=8, s_v=7))
    with pytest.raises(ValueError, match=r"^cudnn_flex: layout must be one of"):
        cudnn_flex.validate_graphs(*qkv(), layout="hsbd")
    with pytest.raises(TypeError, match=r"^cudnn_flex: the keys of score_mod_tensors must be str"):
        cudnn_flex.validate_graphs(*qkv(), dsl_mods.add_bias, None, {0: BIAS})


def test_module_runs_the_same_checks_at_call_time():
    module = cudnn_flex.FlexAttention(dsl_mods.add_bias, backend="reference")
    with pytest.raises(ValueError, match=r"^cudnn_flex: score_mod_tensors\['bias'\] has shape \(3, 8\)"):
        module(*qkv(), score_mod_tensors={"bias": torch.zeros(3, 8)})
    with pytest.raises(ValueError, match=r"^cudnn_flex: backend must be"):
        cudnn_flex.FlexAttention(backend="gpu")(*qkv())


def test_captured_tensor_shorter_than_its_axis_names_the_axis():
    short = torch.ones(5)

    def keys_bias(score, b, h, q_idx, kv_idx):
        return score + short[kv_idx]

    with pytest.raises(ValueError, match=r"^cudnn_flex: the captured tensor indexed as .* has 5 entries along "
                                         r"the key axis, but the scores have 8"):
        cudnn_flex.flex_attention(*qkv(), keys_bias, backend="reference")


@pytest.mark.parametrize("call,error,message", [
    (lambda: cudnn_flex.check_score_mod_bprop(dsl_mods.causal, None, shape=(2, 3, 4)), ValueError,
     r"shape must be \[B, H, Sq, Skv\], got \[2, 3, 4\]"),
    (lambda: cudnn_flex.check_score_mod_bprop(dsl_mods.relative_bias(), lambda g, d_p, t: 1.0), TypeError,
     r"score_mod_bprop returned float"),
])
def test_check_score_mod_bprop_refusals(call, error, message):
    with pytest.raises(error, match=r"^cudnn_flex: " + message):
        call()
