"""cuDNN against the float32 reference on an H100: out, lse, dq, dk, dv."""

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods

from gpu_cases import (ALL_PATTERNS, TOL, bias_pattern, errors, make_inputs, mod_args, pattern_name,
                       run_both)

pytestmark = pytest.mark.gpu


def check(dtype, **kwargs):
    got, want = run_both(**kwargs)
    errs = errors(got, want)
    bad = {k: e for k, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]}: {bad} (all: {errs})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "sbhd"])
@pytest.mark.parametrize("mod", ["none", "identity", "causal", "softcap", "relative_bias", "alibi"])
def test_mods_layouts_dtypes(dtype, layout, mod):
    q, k, v = make_inputs(dtype=dtype, layout=layout)
    args = mod_args(mod, q.shape[1] if layout == "bhsd" else q.shape[2])
    tensors = args.pop("tensors", None)
    check(dtype, q=q, k=k, v=v, tensors=tensors, layout=layout, **args)


@pytest.mark.parametrize("mod", ["none", "causal", "softcap", "alibi"])
@pytest.mark.parametrize("d", [64, 128])
def test_gqa_and_unequal_lengths(mod, d):
    q, k, v = make_inputs(h=8, h_kv=2, s_q=128, s_kv=256, d=d)
    args = mod_args(mod, 8)
    tensors = args.pop("tensors", None)
    check(torch.bfloat16, q=q, k=k, v=v, tensors=tensors, **args)


def test_deterministic_backward_is_bitwise_repeatable():
    q, k, v = make_inputs(h=8, h_kv=2, s_q=512, d=128)
    results = []
    for _ in range(2):
        out = cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, deterministic=True)
        results.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_second_identical_call_builds_nothing():
    q, k, v = make_inputs()
    out = cudnn_flex.flex_attention(q, k, v, dsl_mods.relative_bias)
    out.sum().backward()
    before = cudnn_flex.cache_stats()
    out = cudnn_flex.flex_attention(q, k, v, dsl_mods.relative_bias)
    out.sum().backward()
    after = cudnn_flex.cache_stats()
    assert after["builds"] == before["builds"]
    assert after["hits"] == before["hits"] + 2


def scaled_by(graph, score, tensors):
    return graph.mul(score, tensors["c"])


def scaled_by_bprop(graph, d_p, tensors):
    return graph.mul(d_p, tensors["c"])  # d(c * s)/ds = c


def test_pass_by_value_scalar_changes_result_without_a_build():
    q, k, v = make_inputs()

    def call(c):
        scalar = {"c": torch.tensor(c)}
        out = cudnn_flex.flex_attention(q, k, v, scaled_by, scaled_by_bprop, scalar, scalar)
        return out, torch.autograd.grad(out, q, torch.ones_like(out))[0]

    first = call(1.0)
    builds = cudnn_flex.cache_stats()["builds"]
    second = call(3.0)
    assert cudnn_flex.cache_stats()["builds"] == builds
    assert not torch.allclose(first[0], second[0]) and not torch.allclose(first[1], second[1])
    scalar = {"c": torch.tensor(3.0)}
    got, want = run_both(q, k, v, scaled_by, scaled_by_bprop, scalar)
    assert max(errors(got, want).values()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("mask", ALL_PATTERNS, ids=pattern_name)
def test_bias_of_every_broadcast_pattern(mask):
    b, h, s_q, s_kv = 2, 4, 128, 192
    q, k, v = make_inputs(b=b, h=h, s_q=s_q, s_kv=s_kv)
    bias = bias_pattern(mask, b, h, s_q, s_kv)
    check(torch.bfloat16, q=q, k=k, v=v, score_mod=dsl_mods.add_bias, tensors={"bias": bias})


def test_score_mod_error_leaves_cache_clean_and_next_call_works():
    def broken(graph, score, tensors):
        raise KeyError("no such tensor")

    q, k, v = make_inputs()
    size = cudnn_flex.cache_stats()["size"]
    with pytest.raises(KeyError):
        cudnn_flex.flex_attention(q, k, v, broken)
    assert cudnn_flex.cache_stats()["size"] == size
    check(torch.bfloat16, q=q, k=k, v=v, score_mod=dsl_mods.causal)


def test_refused_head_dim_names_the_problem():
    q, k, v = make_inputs(d=60)  # cuDNN needs a multiple of 8
    with pytest.raises(ValueError, match=r"cuDNN refused .* q \[2,4,128,60\].*cuDNN says"):
        out = cudnn_flex.flex_attention(q, k, v)
        out.sum().backward()


def test_module_wrapper_matches_function():
    q, k, v = make_inputs(layout="bshd")
    module = cudnn_flex.FlexAttention(dsl_mods.causal, layout="bshd")
    assert torch.equal(module(q, k, v), cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, layout="bshd"))
