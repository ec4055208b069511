"""What cuDNN is handed, read on the CPU from validate_graphs' printed JSON (sm_90, meta tensors).

validate_graphs prints, for the forward and then the backward graph, three lines: the score_mod
ops, the frontend graph's JSON, and `score_mod tensors: [...]`, the frontend's JSON of each
score_mod (and score_mod_bprop) tensor as it was given to cuDNN. This file checks
- the broadcast workaround: which score_mod tensor patterns are described at full size with
  stride 0 and which keep their size-1 dims (the rule of expand_broadcast_dims in csrc/ops.cpp,
  written out in cases.EXPANDED_PATTERNS), for all 16 patterns, fewer dims, strided views, GQA,
  bprop tensors and host scalars;
- q, k, v of every layout reach cuDNN as BHSD views (strides only, no copies);
- how cuDNN's refusals map to exceptions: a ValueError saying "cuDNN refused the <pass>
  attention graph at <step>", naming the problem, with cuDNN's reason attached.
"""

from __future__ import annotations

import json

import pytest
import torch

import cudnn_flex
from cases import (ALL_PATTERNS, EXPANDED_PATTERNS, LAYOUTS, TO_BHSD, pattern_name, pattern_shape,
                   shape_in)

# Every size distinct and above 1, so that a dim or stride in the wrong place shows.
B, H, SQ, SKV, D = 2, 4, 128, 192, 64
FULL = [B, H, SQ, SKV]
PREFIX = "score_mod tensors: "


def qkv(b=B, h=H, h_kv=None, s_q=SQ, s_kv=SKV, d=D, d_v=None, dtype=torch.float16, device="meta"):
    h_kv = h_kv or h
    q = torch.empty(b, h, s_q, d, dtype=dtype, device=device)
    k = torch.empty(b, h_kv, s_kv, d, dtype=dtype, device=device)
    v = torch.empty(b, h_kv, s_kv, d_v or d, dtype=dtype, device=device)
    return q, k, v


def add_bias(g, s, t):
    return g.add(s, t["bias"])


def graphs(text: str) -> list[dict]:
    """Per pass (forward, backward): {'ops': [...], 'graph': frontend JSON, 'tensors': [...]}."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("score_mod ops:")]
    assert len(starts) == 2, text[:500]
    out = []
    for i in starts:
        assert lines[i + 2].startswith(PREFIX), lines[i + 2][:200]
        out.append({"ops": lines[i].split()[2:], "graph": json.loads(lines[i + 1]),
                    "tensors": json.loads(lines[i + 2][len(PREFIX):])})
    return out


def mod_tensor_descs(q, k, v, tensors, score_mod=add_bias, **kwargs):
    """[(dim, stride) of each score_mod tensor] per pass, checking that both passes agree."""
    fwd, bwd = graphs(cudnn_flex.validate_graphs(q, k, v, score_mod, score_mod_tensors=tensors, **kwargs))
    got = []
    for per_pass in (fwd, bwd):
        mod = [t for t in per_pass["tensors"] if t["name"].startswith("score_mod_tensor_")]
        got.append([(t["dim"], t["stride"]) for t in mod])
    assert got[0] == got[1], "forward and backward describe the score_mod tensors differently"
    return got[0], fwd["tensors"]


def assert_described(dim, stride, t: torch.Tensor, expanded: bool):
    """`t` (4-D) as cuDNN should get it: at full size with stride 0 on its broadcast dims if
    `expanded`, else its own dims; its own stride on every dim it has (size > 1). The stride of a
    size-1 dim kept at size 1 is never read, so it is not checked."""
    assert len(dim) == 4 and len(stride) == 4
    for i in range(4):
        broadcast = t.shape[i] == 1 and FULL[i] != 1
        if broadcast and expanded:
            assert (dim[i], stride[i]) == (FULL[i], 0), f"dim {i}: {dim}, {stride}"
        elif broadcast:
            assert dim[i] == 1, f"dim {i} should stay size 1: {dim}"
        else:
            assert (dim[i], stride[i]) == (t.shape[i], t.stride(i)), f"dim {i}: {dim}, {stride} vs {t.stride()}"


# --- The broadcast workaround -----------------------------------------------------------------

def test_the_expanded_patterns_are_the_six_documented_ones():
    # cases.EXPANDED_PATTERNS is the rule as docs/broadcasting.md states it; this pins the names.
    assert EXPANDED_PATTERNS == {"B111", "BH11", "111K", "1H1K", "B11K", "BH1K"}
    rule = {pattern_name(m) for m in ALL_PATTERNS if not m[2] and (m[0] or m[3])}
    assert rule == EXPANDED_PATTERNS


@pytest.mark.parametrize("mask", ALL_PATTERNS, ids=pattern_name)
def test_every_broadcast_pattern_is_described_by_the_rule(mask):
    bias = torch.empty(pattern_shape(mask, *FULL), device="meta")
    [(dim, stride)], tensors = mod_tensor_descs(*qkv(), {"bias": bias})
    assert_described(dim, stride, bias, pattern_name(mask) in EXPANDED_PATTERNS)
    [desc] = tensors
    assert desc["data_type"] == "FLOAT" and desc["is_pass_by_value"] is False and desc["uid"] == 1000


@pytest.mark.parametrize("shape,expanded", [
    ([B, 1, 1, 1], True), ([B, H, 1, 1], True), ([1, 1, 1, SKV], True), ([1, H, 1, SKV], True),
    ([B, 1, 1, SKV], True), ([B, H, 1, SKV], True),
    ([1, H, 1, 1], False), ([1, 1, SQ, SKV], False), ([B, H, SQ, SKV], False)],
    ids=lambda x: "x".join(map(str, x)) if isinstance(x, list) else ("expanded" if x else "kept"))
def test_named_patterns_expanded_or_kept(shape, expanded):
    """The patterns of the issue, written out with their exact expected dims and strides."""
    bias = torch.empty(shape, device="meta")
    [(dim, stride)], _ = mod_tensor_descs(*qkv(), {"bias": bias})
    own = list(bias.stride())
    if expanded:
        assert dim == FULL
        assert stride == [own[i] if shape[i] > 1 else 0 for i in range(4)]
    else:
        assert dim == shape
        assert [s for s, n in zip(stride, shape) if n > 1] == [s for s, n in zip(own, shape) if n > 1]


@pytest.mark.parametrize("shape,as4d", [
    ((SKV,), [1, 1, 1, SKV]), ((SQ, SKV), [1, 1, SQ, SKV]), ((SQ, 1), [1, 1, SQ, 1]),
    ((H, 1, 1), [1, H, 1, 1]), ((H, SQ, SKV), [1, H, SQ, SKV]), ((1,), [1, 1, 1, 1])],
    ids=lambda x: "x".join(map(str, x)))
def test_fewer_dims_are_padded_in_front_then_follow_the_rule(shape, as4d):
    bias = torch.empty(shape, device="meta")
    [(dim, stride)], _ = mod_tensor_descs(*qkv(), {"bias": bias})
    name = pattern_name([n != 1 for n in as4d])
    as_tensor = torch.empty(as4d, device="meta")
    assert_described(dim, stride, as_tensor.as_strided(as4d, [1] * (4 - len(shape)) + list(bias.stride())),
                     name in EXPANDED_PATTERNS)


def test_strided_views_are_passed_as_views():
    # A [B, H, Skv, Sq] buffer seen as [B, H, Sq, Skv]: the strides reach cuDNN unchanged.
    transposed = torch.empty(B, H, SKV, SQ, device="meta").transpose(2, 3)
    [(dim, stride)], _ = mod_tensor_descs(*qkv(), {"bias": transposed})
    assert dim == FULL and stride == list(transposed.stride())
    # An expanded view (stride 0 at full size, as a user may pass) stays as it is.
    expanded = torch.empty(1, H, 1, 1, device="meta").expand(B, H, SQ, SKV)
    [(dim, stride)], _ = mod_tensor_descs(*qkv(), {"bias": expanded})
    assert dim == FULL and stride == [0, 1, 0, 0]
    # A slice every other key: stride 2 on Skv.
    sliced = torch.empty(1, 1, 1, 2 * SKV, device="meta")[..., ::2]
    [(dim, stride)], _ = mod_tensor_descs(*qkv(), {"bias": sliced})
    assert dim == FULL and stride == [0, 0, 0, 2]


def test_gqa_broadcasts_against_the_query_heads():
    bias = torch.empty(B, 1, 1, 1, device="meta")
    [(dim, stride)], _ = mod_tensor_descs(*qkv(h=8, h_kv=2), {"bias": bias})
    assert dim == [B, 8, SQ, SKV] and stride == [1, 0, 0, 0]
    slopes = torch.empty(1, 8, 1, 1, device="meta")
    [(dim, _)], _ = mod_tensor_descs(*qkv(h=8, h_kv=2), {"bias": slopes})
    assert dim == [1, 8, 1, 1]


def test_several_tensors_keep_their_order_and_uids():
    def two(g, s, t):
        return g.add(g.mul(s, t["scale"]), t["bias"])

    scale, bias = torch.empty(B, 1, 1, 1, device="meta"), torch.empty(1, H, 1, 1, device="meta")
    descs, tensors = mod_tensor_descs(*qkv(), {"scale": scale, "bias": bias}, score_mod=two)
    assert [t["uid"] for t in tensors] == [1000, 1001]
    assert descs[0] == (FULL, [1, 0, 0, 0]) and descs[1][0] == [1, H, 1, 1]


def test_tensor_dtypes_reach_cudnn():
    for dtype, name in ((torch.float32, "FLOAT"), (torch.float16, "HALF"), (torch.bfloat16, "BFLOAT16"),
                        (torch.int32, "INT32")):
        bias = torch.empty(1, H, SQ, SKV, device="meta", dtype=dtype)
        _, [desc] = mod_tensor_descs(*qkv(), {"bias": bias})
        assert desc["data_type"] == name, (dtype, desc)


def test_host_scalar_is_passed_by_value_as_one_element():
    _, [desc] = mod_tensor_descs(*qkv(), {"bias": torch.tensor(0.5)})
    assert desc["is_pass_by_value"] is True and desc["dim"] == [1, 1, 1, 1]


def test_bprop_tensors_follow_the_same_rule_in_the_backward_only():
    def mul(g, s, t):
        return g.mul(s, t["c"])

    c = torch.empty(B, 1, 1, SKV, device="meta")  # B11K: expanded
    slopes = torch.empty(1, H, 1, 1, device="meta")  # 1H11: kept
    fwd, bwd = graphs(cudnn_flex.validate_graphs(*qkv(), mul, mul, {"c": c}, {"c": slopes}))
    assert [t["name"] for t in fwd["tensors"]] == ["score_mod_tensor_0"]
    assert [t["name"] for t in bwd["tensors"]] == ["score_mod_tensor_0", "score_mod_bprop_tensor_0"]
    mod, bprop = bwd["tensors"]
    assert (mod["dim"], mod["stride"]) == (FULL, [SKV, 0, 0, 1]) and mod["uid"] == 1000
    assert bprop["dim"] == [1, H, 1, 1] and bprop["uid"] == 2000


# --- q, k, v and the outputs as cuDNN gets them -------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_reach_cudnn_as_bhsd_views(layout):
    def made(h, s, d):
        return torch.empty(shape_in(layout, B, h, s, d), dtype=torch.bfloat16, device="meta")

    q, k, v = made(H, SQ, D), made(2, SKV, D), made(2, SKV, 32)  # GQA and d_v != d too
    fwd, bwd = graphs(cudnn_flex.validate_graphs(q, k, v, layout=layout))
    perm = TO_BHSD[layout]
    by_name = {t.get("name"): t for t in fwd["graph"]["tensors"]}
    for name, t in (("Q", q), ("K", k), ("V", v)):
        view = t.permute(perm)
        assert by_name[name]["dim"] == list(view.shape), name
        assert by_name[name]["stride"] == list(view.stride()), name
        assert by_name[name]["data_type"] == "BFLOAT16"
    assert by_name["O"]["dim"] == [B, H, SQ, 32]
    assert by_name["Stats"]["dim"] == [B, H, SQ, 1] and by_name["Stats"]["data_type"] == "FLOAT"
    bwd_names = {t.get("name") for t in bwd["graph"]["tensors"]}
    assert {"Q", "K", "V", "O", "dO", "Stats", "dQ", "dK", "dV"} <= bwd_names


def test_scale_reaches_cudnn_as_its_float_bits():
    fwd, _ = graphs(cudnn_flex.validate_graphs(*qkv(), scale=0.25))
    assert fwd["graph"]["nodes"][0]["attn_scale_value"] == "3E800000"  # 0.25f
    fwd, _ = graphs(cudnn_flex.validate_graphs(*qkv()))  # default 1/sqrt(64) = 0.125
    assert fwd["graph"]["nodes"][0]["attn_scale_value"] == "3E000000"


def test_deterministic_reaches_the_backward_graph():
    for flag in (False, True):
        _, bwd = graphs(cudnn_flex.validate_graphs(*qkv(), deterministic=flag))
        assert bwd["graph"]["nodes"][0]["is_deterministic_algorithm"] is flag


# --- cuDNN's refusals as exceptions -------------------------------------------------------------

REFUSED = {
    # (qkv kwargs, validate kwargs) -> (pass, what cuDNN says)
    "head_dim_60": (dict(d=60), {}, "forward", "multiple of 8"),
    "head_dim_60_bf16": (dict(d=60, dtype=torch.bfloat16), {}, "forward", "multiple of 8"),
    "head_dim_264_backward": (dict(d=264), {}, "backward", "less than or equal to 256"),
    "head_dim_1024_backward": (dict(d=1024, s_q=64, s_kv=64), {}, "backward", "less than or equal to 256"),
    "head_dim_192_backward_sm80": (dict(d=192), dict(sm_version=80), "backward", "less than or equal to 128"),
    "sm75": ({}, dict(sm_version=75), "forward", "SM80"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_graph_is_a_value_error_naming_the_problem(case):
    shape, kwargs, pass_, reason = REFUSED[case]
    q, k, v = qkv(**shape)
    size = cudnn_flex.cache_stats()["size"]
    with pytest.raises(ValueError) as info:
        cudnn_flex.validate_graphs(q, k, v, **kwargs)
    message = str(info.value)
    assert not isinstance(info.value, RuntimeError)
    assert f"cuDNN refused the {pass_} attention graph at validate" in message, message
    dims = lambda t: "[" + ",".join(map(str, t.shape)) + "]"  # noqa: E731
    assert f"q {dims(q)}, k {dims(k)}, v {dims(v)}" in message, message
    assert ("bfloat16" if q.dtype == torch.bfloat16 else "float16") in message
    assert "cuDNN says: " in message and reason in message.split("cuDNN says: ")[1], message
    assert cudnn_flex.cache_stats()["size"] == size
    # The process is fine: an accepted problem validates next.
    graphs(cudnn_flex.validate_graphs(*qkv()))


def test_the_head_dim_limits_are_exact():
    # Accepted right up to each limit (so the refusals above are the limits, not any large dim).
    for d in (8, 72, 256):
        graphs(cudnn_flex.validate_graphs(*qkv(d=d, s_q=64, s_kv=64)))
    graphs(cudnn_flex.validate_graphs(*qkv(d=128), sm_version=80))
    # d_v != d is accepted.
    graphs(cudnn_flex.validate_graphs(*qkv(d=64, d_v=128)))


def test_the_refusal_names_the_score_mod_and_bprop():
    def half(g, s, t):
        return g.mul(s, 0.5)

    # The backward refuses d = 264: its problem has the bprop.
    with pytest.raises(ValueError, match=r"backward .* float16 with a score_mod and a score_mod_bprop\. cuDNN says"):
        cudnn_flex.validate_graphs(*qkv(d=264, s_q=64, s_kv=64), half, half)
    # The forward refuses d = 60 (a forward problem has no bprop).
    with pytest.raises(ValueError, match=r"forward .* float16 with a score_mod\. cuDNN says"):
        cudnn_flex.validate_graphs(*qkv(d=60), half, half)
    with pytest.raises(ValueError, match=r"backward .* bfloat16\. cuDNN says"):
        cudnn_flex.validate_graphs(*qkv(d=264, s_q=64, s_kv=64, dtype=torch.bfloat16))
