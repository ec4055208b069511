"""Hypothesis over shapes, layouts, dtypes and GQA ratios on the CPU (reference path and argument
checks): every outcome is a result of the right shape or a documented error (ValueError/TypeError)."""

import warnings

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

LAYOUTS = ["bhsd", "bshd", "sbhd", "bad"]
MODS = [None, dsl_mods.causal, dsl_mods.relative_bias, dsl_mods.SlidingWindow(2)]


@settings(max_examples=150, deadline=None)
@given(b=st.integers(0, 2), h_kv=st.integers(1, 3), ratio=st.integers(1, 3), s_q=st.integers(0, 9),
       s_kv=st.integers(0, 9), d=st.sampled_from([1, 4, 8]), d_v=st.sampled_from([4, 8]),
       layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       mod=st.sampled_from(MODS), h_q_extra=st.integers(0, 1), scale=st.sampled_from([None, 0.5, float("nan")]))
def test_flex_attention_returns_or_raises_documented_errors(b, h_kv, ratio, s_q, s_kv, d, d_v, layout, dtype,
                                                           mod, h_q_extra, scale):
    h_q = h_kv * ratio + h_q_extra  # sometimes not a multiple: must be refused
    order = {"bhsd": lambda h, s, dd: (b, h, s, dd), "bshd": lambda h, s, dd: (b, s, h, dd),
             "sbhd": lambda h, s, dd: (s, b, h, dd), "bad": lambda h, s, dd: (b, h, s, dd)}[layout]
    q = torch.randn(order(h_q, s_q, d), dtype=dtype)
    k = torch.randn(order(h_kv, s_kv, d), dtype=dtype)
    v = torch.randn(order(h_kv, s_kv, d_v), dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cudnn_flex.ReferencePathWarning)
            out = cudnn_flex.flex_attention(q, k, v, mod, scale=scale, layout=layout)
    except (ValueError, TypeError) as e:
        assert str(e).startswith("cudnn_flex: "), e
        return
    assert layout != "bad" and h_q % h_kv == 0 and scale == scale
    assert out.shape == order(h_q, s_q, d_v) and out.dtype == dtype
