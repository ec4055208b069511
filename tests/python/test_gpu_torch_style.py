"""Torch-style mods and the ready mods on cuDNN against their formulas written out (GPU).

The cases are the CPU tests' own tables: every ready mod of mod_cases.READY_MODS (formulas
written out, ALiBi slopes as literal numbers) and every torch-style construct of
test_torch_style_formulas.CASES (the same expression in plain torch). cudnn-flex runs them in
bf16 on cuDNN (automatic bprop unless the case gives one); the expected out, lse, dq, dk, dv come
from oracle.attention in float64 on the same rounded inputs. Nothing of cudnn_flex (no mods.*
callable, no alibi_slopes, no reference path) is on the expected side.
"""

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods
from gpu_cases import check, compare, make_inputs
from mod_cases import DOC, DOC_PER_BATCH, MAX_LEN, READY_MODS
from oracle import NEG_INF
from test_torch_style_formulas import CASES as CONSTRUCTS
from test_torch_style_formulas import SHAPES as CONSTRUCT_SHAPES

pytestmark = pytest.mark.gpu

# B, H_q, H_kv, Sq, Skv: GQA, Sq != Skv, lengths that fill no tile exactly (READY_MODS' document
# ids cover MAX_LEN = 40 positions).
B, H, H_KV, SQ, SKV, D = 2, 4, 2, 33, MAX_LEN, 64
# The cases that index no document ids run at lengths of several cuDNN tiles too.
LONG = ["causal", "sliding_window_3", "prefix_lm_3", "softcap", "alibi", "alibi_standard_slopes",
        "relative_bias_scaled", "compose_bias_then_softcap", "compose_softcap_masked", "softcap_causal",
        "alibi_sliding_window", "scale_relative_bias", "dsl_alibi", "dsl_softcap", "dsl_sliding_window_3"]


def run_case(kwargs, formula, b, h, h_kv, s_q, s_kv, d=D, d_v=None, seed=0, label=""):
    q, k, v = make_inputs(b=b, h=h, h_kv=h_kv, s_q=s_q, s_kv=s_kv, d=d, d_v=d_v, seed=seed)
    got, want = compare(q, k, v, formula, **kwargs)
    return check(got, want, label=label)


@pytest.mark.parametrize("name", READY_MODS)
def test_ready_mod_matches_its_formula(name):
    kwargs, formula = READY_MODS[name](B, H, SQ, SKV)
    run_case(kwargs, formula, B, H, H_KV, SQ, SKV, seed=list(READY_MODS).index(name), label=name)


@pytest.mark.parametrize("name", LONG)
def test_ready_mod_over_several_tiles(name):
    b, h, s_q, s_kv = 1, 8, 200, 264
    kwargs, formula = READY_MODS[name](b, h, s_q, s_kv)
    run_case(kwargs, formula, b, h, 2, s_q, s_kv, d=128, label=name)


@pytest.mark.parametrize("name", CONSTRUCTS)
def test_torch_style_construct_matches_plain_torch(name):
    score_mod, mask_mod, formula = CONSTRUCTS[name]
    b, h_q, h_kv, s_q, s_kv, _, _ = CONSTRUCT_SHAPES["7x12_gqa_dv6"]
    kwargs = {"score_mod": score_mod, "mask_mod": mask_mod}
    run_case(kwargs, formula, b, h_q, h_kv, s_q, s_kv, d=64, d_v=32, label=name)


def test_second_call_with_new_captured_values_builds_nothing():
    q, k, v = make_inputs(b=B, h=H, h_kv=H_KV, s_q=MAX_LEN, s_kv=MAX_LEN, seed=99)
    first = compare(q, k, v, lambda s, b, h, q_, kv: torch.where(DOC[q_] == DOC[kv], s, NEG_INF),
                    mask_mod=mods.document_mask(DOC))
    check(*first, label="first doc ids")
    builds = cudnn_flex.cache_stats()["builds"]
    other = DOC_PER_BATCH[1]
    second = compare(q, k, v, lambda s, b, h, q_, kv: torch.where(other[q_] == other[kv], s, NEG_INF),
                     mask_mod=mods.document_mask(other))
    assert cudnn_flex.cache_stats()["builds"] == builds
    check(*second, label="new doc ids")


def softcap_kwargs(variant, cap):
    if variant == "hand_written_bprop":
        softcap = dsl_mods.softcap(cap)
        return dict(score_mod=softcap.forward, score_mod_bprop=softcap.backward)
    if variant == "derived_bprop":
        return dict(score_mod=dsl_mods.softcap(cap).forward)
    return dict(score_mod=mods.softcap(cap))


@pytest.mark.parametrize("variant", ["hand_written_bprop", "derived_bprop", "torch_style"])
def test_softcap_bprops_each_match_the_formula(variant):
    cap = 2.5
    q, k, v = make_inputs(b=B, h=H, h_kv=H_KV, s_q=128, s_kv=128, seed=7)
    q = (q.detach() * 3).requires_grad_()  # scores of a few units, so that the cap bends them
    got, want = compare(q, k, v, lambda s, b, h, q_, kv: cap * torch.tanh(s / cap), **softcap_kwargs(variant, cap))
    check(got, want, label=variant)


# Gathers by a computed index (gather.py), in the shapes of attention-gym's document mask with
# offsets, Sandwich / learned relative positions and Graphormer, at S = 129 (no multiple of the
# tile). Each mod is made twice from one factory: over CUDA tensors for cuDNN and over their CPU
# copies for the float64 formula.
GS = 129
_g = torch.Generator().manual_seed(21)
G_OFFSETS = torch.tensor([0, 1, 60, 129])  # documents of 1, 59 and 69 tokens
G_DOC = torch.repeat_interleave(torch.arange(3), G_OFFSETS[1:] - G_OFFSETS[:-1])
G_REL = torch.randn(2 * GS - 1, generator=_g)
G_HEAD_SCALE = torch.tensor([0.5, 1.0, 2.0, -1.0])
G_DIST = torch.randint(0, 5, (2, GS, GS), generator=_g)
G_SPATIAL = torch.randn(4, 5, generator=_g)


def document_with_offsets(doc, offsets):
    def mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx - offsets[doc[q_idx]] >= kv_idx - offsets[doc[kv_idx]])
    return mask


def sandwich(rel, head_scale):
    return lambda score, b, h, q_idx, kv_idx: score + rel[q_idx - kv_idx + (GS - 1)] * head_scale[h]


def graphormer(spatial, dist):
    return lambda score, b, h, q_idx, kv_idx: score + spatial[h, dist[b, q_idx, kv_idx]]


GATHERS = {  # name -> (factory, its tensors, is a mask_mod)
    "document_with_offsets": (document_with_offsets, (G_DOC, G_OFFSETS), True),
    "sandwich": (sandwich, (G_REL, G_HEAD_SCALE), False),
    "graphormer": (graphormer, (G_SPATIAL, G_DIST), False),
}


@pytest.mark.parametrize("name", GATHERS)
def test_gather_by_a_computed_index_matches_its_formula(name):
    factory, tensors, is_mask = GATHERS[name]
    on_gpu, on_cpu = factory(*(t.cuda() for t in tensors)), factory(*tensors)
    if is_mask:
        kwargs = {"mask_mod": on_gpu}
        formula = lambda s, *idx: s.masked_fill(~on_cpu(*idx), NEG_INF)  # noqa: E731
    else:
        kwargs, formula = {"score_mod": on_gpu}, on_cpu
    for call in range(2):  # the second call reuses the gathered tensor
        run_case(kwargs, formula, 2, 4, 2, GS, GS, seed=call, label=f"{name}, call {call}")


# int32 tensors are read by cuDNN in place (INT32 inputs, where int64 ones are float32 copies):
# each form that meets an INT32 input, with an index, a float tensor, a computed value, arithmetic.
I_IDS = (torch.arange(GS) * 3 // GS).to(torch.int32)  # three documents: 0, 1, 2
I_PREFIX = torch.tensor([5, 70], dtype=torch.int32)
I_BOUND = torch.tensor([0.5, 1.5, 2.5, -0.5])  # float32, per head


def _int32_forms():
    return {
        "prefix per batch": (lambda p, i, t: lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) | (kv_idx < p[b]), True),
        "prefix first": (lambda p, i, t: lambda b, h, q_idx, kv_idx: (p[b] > kv_idx) | (q_idx >= kv_idx), True),
        "ids against a float tensor": (
            lambda p, i, t: lambda b, h, q_idx, kv_idx: (i[q_idx] <= t[h]) | (q_idx == kv_idx), True),
        "ids against a computed float": (
            lambda p, i, t: lambda b, h, q_idx, kv_idx: (i[kv_idx] >= q_idx * 0.02) | (q_idx == kv_idx), True),
        "ids in arithmetic": (
            lambda p, i, t: lambda score, b, h, q_idx, kv_idx: score + i[q_idx] * 0.25 - i[kv_idx] * 0.5, False),
        "ids in a where": (
            lambda p, i, t: lambda score, b, h, q_idx, kv_idx: torch.where(i[q_idx] == i[kv_idx], score, score - 2.0),
            False),
    }


@pytest.mark.parametrize("s_q,s_kv", [(1, 129), (127, 127), (129, 64)])
@pytest.mark.parametrize("name", list(_int32_forms()))
def test_int32_tensors_read_in_place_match_plain_torch(name, s_q, s_kv):
    factory, is_mask = _int32_forms()[name]
    on_gpu = factory(I_PREFIX.cuda(), I_IDS.cuda(), I_BOUND.cuda())
    on_cpu = factory(I_PREFIX, I_IDS, I_BOUND)
    if is_mask:
        kwargs = {"mask_mod": on_gpu}
        formula = lambda s, *idx: s.masked_fill(~on_cpu(*idx), NEG_INF)  # noqa: E731
    else:
        kwargs, formula = {"score_mod": on_gpu}, on_cpu
    for call in range(2):  # the second by the shortcut
        run_case(kwargs, formula, 2, 4, 2, s_q, s_kv, seed=call, label=f"{name} {s_q}x{s_kv}, call {call}")
