"""torch.ops.cudnn_flex.* are public (models call them directly): bad input gets a named error
from C++ or the fake kernels, never a crash inside cuDNN."""

import pytest
import torch

import cudnn_flex  # noqa: F401  (registers the ops)

FWD = torch.ops.cudnn_flex.fwd.default
VALIDATE = torch.ops.cudnn_flex.validate.default


def meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("shape_q,shape_kv", [((1, 2, 0, 8), (1, 2, 16, 8)),   # Sq = 0
                                              ((1, 0, 16, 8), (1, 1, 16, 8)),   # H_q = 0
                                              ((0, 2, 16, 8), (0, 2, 16, 8)),   # B = 0
                                              ((1, 2, 16, 8), (1, 2, 0, 8))])   # Skv = 0
def test_validate_graphs_of_empty_problems_builds_nothing(shape_q, shape_kv):
    q = torch.randn(*shape_q, dtype=torch.float16)
    k = torch.randn(*shape_kv, dtype=torch.float16)
    text = cudnn_flex.validate_graphs(q, k, k.clone(), cudnn_flex.dsl_mods.causal)
    assert text.startswith("empty problem")


def test_validate_op_with_no_kv_heads_is_an_error():
    q, k = torch.randn(1, 2, 8, 8, dtype=torch.float16), torch.randn(1, 0, 8, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="same number of heads"):
        VALIDATE(q, k, k, [], [], 0, 0, None, False, 90, [], [], [])


def test_validate_op_refuses_a_score_mod_tensor_that_does_not_broadcast():
    q = torch.randn(1, 2, 8, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="does not broadcast"):
        VALIDATE(q, q, q, [torch.zeros(3, 1, 1, 1)], [], 0, 0, None, False, 90, [], [], [])


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v, t: (q, k.to(torch.bfloat16), v, t), "one dtype"),
    (lambda q, k, v, t: (q, meta(1, 3, 8, 8), meta(1, 3, 8, 8), t), "number of heads"),
    (lambda q, k, v, t: (q, k, v, [torch.zeros(1, 1, 8, 8)]), "is on cpu but q is on meta"),
    (lambda q, k, v, t: (q, k, v, [meta(1, 1, 1, 1, 8)]), "more than 4 dims"),
])
def test_fake_kernel_checks_what_the_cuda_kernel_checks(change, message):
    q, k, v, t = change(meta(1, 2, 8, 8), meta(1, 2, 8, 8), meta(1, 2, 8, 8), [])
    with pytest.raises(ValueError, match=message):
        FWD(q, k, v, t, [], 0, 0, True, None, False, [], [], [])


def test_one_element_cpu_tensor_is_passed_by_value():
    q = meta(1, 2, 8, 8)
    out, lse = FWD(q, q, q, [torch.tensor(0.5)], [], 0, 0, True, None, False, [], [], [])
    assert out.shape == q.shape and lse.shape == (1, 2, 8)


def test_bool_score_mod_tensor_reaches_cudnn_as_float_and_is_compared_with_zero():
    q = torch.randn(1, 2, 8, 8, dtype=torch.float16)
    keep = torch.rand(1, 2, 8, 8) > 0.3

    def masked(graph, score, tensors):
        return graph.binary_select(score, float("-inf"), tensors["keep"])

    text = cudnn_flex.validate_graphs(q, q, q, masked, score_mod_tensors={"keep": keep})
    assert "BOOLEAN" not in text.split("score_mod tensors:")[-1] and "CMP_NEQ" in text


def test_captured_bool_mask_on_the_reference_path():
    """torch's create_mask gives a dense bool tensor that mods index as dense[b, h, q, kv]."""
    import warnings
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    dense = torch.rand(2, 2, 9, 9, generator=g) > 0.4
    dense[..., 0] = True

    def mask(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx, kv_idx]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cudnn_flex.flex_attention(q, k, v, mask_mod=mask)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    want = torch.softmax(scores.masked_fill(~dense, float("-inf")), -1) @ v
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
