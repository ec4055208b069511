"""The score_mod DSL's defaults and shapes, observed through public calls only.

Default data types (index -> INT32, comparison -> BOOLEAN, arithmetic -> FLOAT) without setting
any: read back from the graph tensors on the bridge (validate_graphs, no GPU) and on the reference
path, and seen in results (an index divided by 2 is not truncated; an index compared with 2.5 is
not compared with 2). A value head dim different from the query head dim in every layout, and
score_mod tensors of fewer than 4 dims, against oracle.attention.
"""

import pytest
import torch

import cudnn_flex
from cudnn_flex import data_type, dsl_mods
from mod_cases import check_against_formula
from oracle import NEG_INF, attention

TO_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3)}


def _recording(seen):
    def mod(graph, score, tensors):
        row, col = graph.gen_index(score, 2), graph.gen_index(score, 3)
        mask = graph.cmp_ge(row, col)
        op_mask = (row >= col) & ~(row > 5) | (col < 1)
        distance = graph.sub(row, col)
        half = row / 2
        biased = graph.add(score, graph.mul(distance, 0.5)) + half
        both = graph.logical_and(mask, op_mask)
        seen.append(dict(graph=graph, index=row.get_data_type(), compare=mask.get_data_type(),
                         operators=op_mask.get_data_type(), logical=both.get_data_type(),
                         index_arithmetic=distance.get_data_type(), index_operator=half.get_data_type(),
                         score_arithmetic=biased.get_data_type()))
        return graph.binary_select(biased, NEG_INF, both)
    return mod


EXPECTED = dict(index=data_type.INT32, compare=data_type.BOOLEAN, operators=data_type.BOOLEAN,
                logical=data_type.BOOLEAN, index_arithmetic=data_type.FLOAT, index_operator=data_type.FLOAT,
                score_arithmetic=data_type.FLOAT)


def test_default_data_types_on_the_cudnn_graph():
    seen = []
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    cudnn_flex.validate_graphs(q, q, q, _recording(seen))
    assert seen  # the graph(s) the score_mod is run on while the cuDNN graphs are built
    for s in seen:
        assert {k: v for k, v in s.items() if k != "graph"} == EXPECTED


def test_default_data_types_on_the_reference_path():
    seen = []
    q = torch.randn(1, 2, 8, 16, dtype=torch.float32)  # (float64 input computes in DOUBLE there)
    cudnn_flex.flex_attention(q, q, q, _recording(seen), backend="reference")
    assert len(seen) == 1 and {k: v for k, v in seen[0].items() if k != "graph"} == EXPECTED


def _index_over_two(graph, score, tensors):
    return graph.add(score, graph.div(graph.gen_index(score, 2), 2.0))


def _index_below_two_and_a_half(graph, score, tensors):
    return graph.binary_select(score, NEG_INF, graph.cmp_lt(graph.gen_index(score, 3), 2.5))


def _index_difference_negative(graph, score, tensors):
    return graph.add(score, graph.mul(graph.sub(graph.gen_index(score, 2), graph.gen_index(score, 3)), 0.75))


@pytest.mark.parametrize("mod,formula", [
    (_index_over_two, lambda s, b, h, q, kv: s + q / 2.0),                   # FLOAT division, not INT32
    (_index_below_two_and_a_half, lambda s, b, h, q, kv: torch.where(kv <= 2, s, NEG_INF)),  # 2 < 2.5
    (_index_difference_negative, lambda s, b, h, q, kv: s + (q - kv) * 0.75),  # signed, not wrapped
], ids=["div", "compare", "sub"])
def test_default_arithmetic_on_indices_is_float(mod, formula):
    check_against_formula((1, 2, 2, 7, 9, 8, 8), dict(score_mod=mod), formula)


# --- d_v != d in every layout -------------------------------------------------------------------

@pytest.mark.parametrize("layout", TO_BHSD)
@pytest.mark.parametrize("d,d_v", [(8, 3), (4, 16), (1, 5)])
def test_value_head_dim_differs_from_query_head_dim(layout, d, d_v):
    g = torch.Generator().manual_seed(d * 100 + d_v)
    q = torch.randn(2, 4, 7, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 5, d, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 5, d_v, generator=g, dtype=torch.float64)
    inv = tuple(sorted(range(4), key=lambda i: TO_BHSD[layout][i]))
    out, lse = cudnn_flex.flex_attention(*(t.permute(inv) for t in (q, k, v)), dsl_mods.causal, layout=layout,
                                         return_lse=True, backend="reference")
    expected, expected_lse = attention(q, k, v, lambda s, b, h, qi, kv: torch.where(qi >= kv, s, NEG_INF))
    assert out.shape == expected.permute(inv).shape
    torch.testing.assert_close(out.permute(TO_BHSD[layout]), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-9, atol=1e-9)


# --- score_mod tensors of fewer than 4 dims on the cuDNN graph ---------------------------------

@pytest.mark.parametrize("shape", [(2, 1, 1), (9,), (7, 1), (7, 9), (1, 9), (2, 7, 9)])
def test_score_mod_tensors_of_fewer_dims_build_for_cudnn(shape):
    q = torch.randn(1, 2, 7, 16, dtype=torch.float16)
    k = torch.randn(1, 2, 9, 16, dtype=torch.float16)
    bias = torch.randn(shape, dtype=torch.float16)
    assert "score_mod ops: ADD" in cudnn_flex.validate_graphs(q, k, k, dsl_mods.add_bias, score_mod_tensors={"bias": bias})
