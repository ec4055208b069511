"""cuDNN against the formula written out, on an H100: out, lse, dq, dk, dv.

Expected values: oracle.attention in float64 on the CPU, with the ready mods' formulas from
mod_cases.py and DSL score_mods written out by dsl_torch.py (gpu_cases.compare).
"""

import pytest
import torch

import cudnn_flex
from cases import ALL_PATTERNS, LAYOUTS, pattern_name
from cudnn_flex import dsl_mods
from dsl_tensor_mods import scaled_by, scaled_by_bprop
import oracle
from gpu_cases import bias_pattern, check, compare, dsl_formula, make_inputs
from mod_cases import READY_MODS
from oracle import NEG_INF

pytestmark = pytest.mark.gpu


def identity(graph, score, tensors):
    return score


def mod_case(name, b, h, s_q, s_kv):
    """(flex_attention kwargs, formula) of a READY_MODS case, or of no score_mod / identity."""
    if name == "none":
        return {}, None
    if name == "identity":
        return dict(score_mod=identity), lambda s, b_, h_, q, kv: s
    return READY_MODS[name](b, h, s_q, s_kv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mod", ["none", "identity", "dsl_causal", "dsl_softcap", "dsl_relative_bias", "dsl_alibi"])
def test_mods_layouts_dtypes(dtype, layout, mod):
    b, h, s = 2, 4, 128
    q, k, v = make_inputs(b=b, h=h, s_q=s, dtype=dtype, layout=layout)
    kwargs, formula = mod_case(mod, b, h, s, s)
    got, want = compare(q, k, v, formula, layout=layout, **kwargs)
    check(got, want, dtype, label=f"{mod} {layout}")


@pytest.mark.parametrize("mod", ["none", "dsl_causal", "dsl_softcap", "dsl_alibi", "causal", "alibi"])
@pytest.mark.parametrize("d,d_v", [(64, 64), (128, 128), (64, 128), (128, 64)])
def test_gqa_unequal_lengths_and_value_head_dim(mod, d, d_v):
    b, h, s_q, s_kv = 2, 8, 128, 256
    q, k, v = make_inputs(b=b, h=h, h_kv=2, s_q=s_q, s_kv=s_kv, d=d, d_v=d_v)
    kwargs, formula = mod_case(mod, b, h, s_q, s_kv)
    got, want = compare(q, k, v, formula, **kwargs)
    check(got, want, label=f"{mod} d={d} d_v={d_v}")


@pytest.mark.parametrize("scale", [0.05, 0.3])
def test_explicit_scale(scale):
    q, k, v = make_inputs(s_q=96, s_kv=160)
    got, want = compare(q, k, v, dsl_formula(dsl_mods.relative_bias()), score_mod=dsl_mods.relative_bias(),
                        scale=scale)
    check(got, want, label=f"scale {scale}")


def test_deterministic_backward_is_bitwise_repeatable_and_right():
    q, k, v = make_inputs(h=8, h_kv=2, s_q=512, d=128)
    results = []
    for _ in range(2):
        out = cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, deterministic=True)
        results.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    got, want = compare(q, k, v, dsl_formula(dsl_mods.causal), score_mod=dsl_mods.causal, deterministic=True)
    check(got, want, label="deterministic")


def test_second_identical_call_builds_nothing():
    q, k, v = make_inputs()
    out = cudnn_flex.flex_attention(q, k, v, dsl_mods.relative_bias())
    out.sum().backward()
    before = cudnn_flex.cache_stats()
    out = cudnn_flex.flex_attention(q, k, v, dsl_mods.relative_bias())
    out.sum().backward()
    after = cudnn_flex.cache_stats()
    assert after["builds"] == before["builds"]
    assert after["hits"] == before["hits"] + 2


def test_pass_by_value_scalar_changes_result_without_a_build():
    q, k, v = make_inputs()

    def call(c):
        scalar = {"c": torch.tensor(c)}
        out = cudnn_flex.flex_attention(q, k, v, scaled_by, scaled_by_bprop, scalar, scalar)
        return out, torch.autograd.grad(out, q, torch.ones_like(out))[0]

    call(1.0)
    builds = cudnn_flex.cache_stats()["builds"]
    for c in (3.0, 0.25):
        call(c)
        assert cudnn_flex.cache_stats()["builds"] == builds
        scalar = {"c": torch.tensor(c)}
        got, want = compare(q, k, v, lambda s, b, h, q_, kv: s * c, score_mod=scaled_by,
                            score_mod_bprop=scaled_by_bprop, score_mod_tensors=scalar, score_mod_bprop_tensors=scalar)
        check(got, want, label=f"c={c}")


@pytest.mark.parametrize("mask", ALL_PATTERNS, ids=pattern_name)
def test_bias_of_every_broadcast_pattern(mask):
    b, h, s_q, s_kv = 2, 4, 128, 192
    q, k, v = make_inputs(b=b, h=h, s_q=s_q, s_kv=s_kv)
    bias = bias_pattern(mask, b, h, s_q, s_kv)
    got, want = compare(q, k, v, lambda s, b_, h_, q_, kv: s + bias.double(), score_mod=dsl_mods.add_bias,
                        score_mod_tensors={"bias": bias})
    check(got, want, label=pattern_name(mask))


@pytest.mark.parametrize("shape", [(192,), (128, 192), (4, 1, 1), (4, 128, 192), (128, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bias_of_fewer_than_four_dims(shape):
    q, k, v = make_inputs(b=2, h=4, s_q=128, s_kv=192)
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    got, want = compare(q, k, v, lambda s, b_, h_, q_, kv: s + bias.double(), score_mod=dsl_mods.add_bias,
                        score_mod_tensors={"bias": bias})
    check(got, want, label=str(shape))


def test_score_mod_error_leaves_cache_clean_and_next_call_works():
    def broken(graph, score, tensors):
        raise KeyError("no such tensor")

    q, k, v = make_inputs()
    size = cudnn_flex.cache_stats()["size"]
    with pytest.raises(KeyError):
        cudnn_flex.flex_attention(q, k, v, broken)
    assert cudnn_flex.cache_stats()["size"] == size
    got, want = compare(q, k, v, lambda s, b, h, q_, kv: torch.where(q_ >= kv, s, NEG_INF), score_mod=dsl_mods.causal)
    check(got, want, label="after an error")


def test_refused_head_dim_names_the_problem():
    q, k, v = make_inputs(d=60)  # cuDNN needs a multiple of 8
    with pytest.raises(ValueError, match=r"cuDNN refused .* q \[2,4,128,60\].*cuDNN says"):
        out = cudnn_flex.flex_attention(q, k, v)
        out.sum().backward()


def test_module_wrapper_matches_the_formula():
    q, k, v = make_inputs(layout="bshd")
    module = cudnn_flex.FlexAttention(dsl_mods.causal, layout="bshd")
    out = module(q, k, v)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    to_bhsd = lambda t: t.detach().permute(0, 2, 1, 3).double().cpu()  # noqa: E731
    qf, kf, vf = (to_bhsd(t).requires_grad_() for t in (q, k, v))
    want_out, _ = oracle.attention(qf, kf, vf, lambda s, b, h, q_, kv: torch.where(q_ >= kv, s, NEG_INF))
    want_grads = torch.autograd.grad(want_out, (qf, kf, vf), to_bhsd(d_out))
    got = dict(zip(("out", "dq", "dk", "dv"), map(to_bhsd, (out, *grads))))
    want = dict(zip(("out", "dq", "dk", "dv"), (want_out.detach(), *want_grads)))
    check(got, want, label="FlexAttention")
