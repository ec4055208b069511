"""Op schemas, fake tensors and autograd registration, all without a GPU."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cudnn_flex  # noqa: F401  (registers the ops)
from cases import FROM_BHSD, LAYOUTS, TO_BHSD, shape_in
from cudnn_flex._ops import strides_like


def test_ops_are_registered_with_schemas():
    fwd = torch.ops.cudnn_flex.fwd.default._schema
    bwd = torch.ops.cudnn_flex.bwd.default._schema
    assert [a.name for a in fwd.arguments][:3] == ["q", "k", "v"]
    assert [r.name for r in fwd.returns] == ["out", "lse"]
    assert [r.name for r in bwd.returns] == ["dq", "dk", "dv"]
    assert not fwd.is_mutable and not bwd.is_mutable


def fake_fwd(q, k, v):
    return torch.ops.cudnn_flex.fwd(q, k, v, [], [], 0, 0, True, 0.125, False, [], [], [])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("h_kv", [8, 2, 1])
def test_fake_shapes_for_layouts_and_gqa(layout, h_kv):
    b, h, s_q, s_kv, d, d_v = 2, 8, 96, 160, 64, 32
    perm = TO_BHSD[layout]

    def bhsd_view(heads, s, dim):
        return torch.empty(shape_in(layout, b, heads, s, dim), dtype=torch.bfloat16, device="cuda").permute(perm)

    with FakeTensorMode():
        q, k, v = bhsd_view(h, s_q, d), bhsd_view(h_kv, s_kv, d), bhsd_view(h_kv, s_kv, d_v)
        out, lse = fake_fwd(q, k, v)
        assert out.shape == (b, h, s_q, d_v) and out.dtype == torch.bfloat16
        assert lse.shape == (b, h, s_q) and lse.dtype == torch.float32
        # The output is laid out in memory like q, so the user's layout comes back as a view.
        assert out.stride() == tuple(strides_like(q, out.shape))
        assert out.permute(FROM_BHSD[layout]).is_contiguous()
        dq, dk, dv = torch.ops.cudnn_flex.bwd(out, q, k, v, out, lse, [], [], 0, 0, True, 0.125, False, [], [], [])
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert dk.stride() == tuple(strides_like(k, k.shape))


@pytest.mark.parametrize("order", ["THD", "HTD view"])
def test_fake_shapes_for_packed_sequences(order):
    """flex_attention_varlen hands the op [total, H, D] tensors: out comes back [total, H, D_v] in
    q's dimension order, lse per sequence and position [n, H, max_q], gradients like q, k, v."""
    total_q, total_kv, h, h_kv, d, d_v, n, max_q, max_kv = 300, 200, 8, 2, 64, 32, 3, 150, 90

    def packed(total, heads, dim):
        if order == "THD":
            return torch.empty(total, heads, dim, dtype=torch.bfloat16, device="cuda")
        return torch.empty(heads, total, dim, dtype=torch.bfloat16, device="cuda").transpose(0, 1)

    with FakeTensorMode():
        q, k, v = packed(total_q, h, d), packed(total_kv, h_kv, d), packed(total_kv, h_kv, d_v)
        cu_q = torch.empty(n + 1, dtype=torch.int32, device="cuda")
        cu_kv = torch.empty(n + 1, dtype=torch.int32, device="cuda")
        lens = [torch.empty(n, dtype=torch.int32, device="cuda") for _ in range(2)]
        packing = (lens, [cu_q, cu_kv], [max_q, max_kv])
        out, lse = torch.ops.cudnn_flex.fwd(q, k, v, [], [], 0, 0, True, None, False, *packing)
        assert out.shape == (total_q, h, d_v) and lse.shape == (n, h, max_q)
        assert out.stride() == tuple(strides_like(q, out.shape))
        dq, dk, dv = torch.ops.cudnn_flex.bwd(out, q, k, v, out, lse, [], [], 0, 0, True, None, False, *packing)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        with pytest.raises(ValueError, match="packed: \\[total, H, D\\]"):
            torch.ops.cudnn_flex.fwd(q, k.unsqueeze(0), v, [], [], 0, 0, True, None, False, *packing)


def meta_qkv():
    return [torch.empty(1, 2, 16, 64, dtype=torch.float16, device="meta", requires_grad=True) for _ in range(3)]


def test_autograd_is_registered_on_fwd():
    q, k, v = meta_qkv()
    out, lse = fake_fwd(q, k, v)
    assert out.requires_grad and out.grad_fn is not None
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_a_call_nothing_differentiates_makes_no_autograd_node():
    """No node where autograd would find none needed (no_grad, q, k, v without grad): the fast
    path of an inference call. Score_mod tensors get no gradient, with or without a node."""
    q, k, v = meta_qkv()
    with torch.no_grad():
        out, lse = fake_fwd(q, k, v)
    assert out.grad_fn is None and not out.requires_grad and lse.shape == (1, 2, 16)
    out, _ = fake_fwd(q.detach(), k.detach(), v.detach())
    assert out.grad_fn is None
    bias = torch.empty(1, 2, 16, 16, device="meta", requires_grad=True)
    out, _ = torch.ops.cudnn_flex.fwd(q.detach(), k.detach(), v.detach(), [bias], [], 1, 0, True, 0.125, False,
                                      [], [], [])
    assert out.grad_fn is None
    out, _ = torch.ops.cudnn_flex.fwd(q, k.detach(), v.detach(), [bias], [], 1, 0, True, 0.125, False, [], [], [])
    assert out.grad_fn is not None
    out.sum().backward()
    assert q.grad.shape == q.shape and bias.grad is None


def test_gradient_through_lse_runs_the_backward_with_widened_values():
    """lse's gradient is folded into the backward by 8 extra value columns (csrc/autograd.cpp):
    the gradients keep the inputs' shapes."""
    q, k, v = meta_qkv()
    out, lse = fake_fwd(q, k, v)
    (out.sum() + lse.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_gradient_through_lse_with_the_widest_value_head_is_refused():
    q, k, _ = meta_qkv()
    v = torch.empty(1, 2, 16, 256, dtype=torch.float16, device="meta", requires_grad=True)
    out, lse = fake_fwd(q, k, v)
    with pytest.raises(NotImplementedError, match="at most 248"):
        lse.sum().backward()


def test_strides_like_matches_layouts():
    t = torch.empty(2, 5, 3, 4).permute(0, 2, 1, 3)  # bshd memory seen as bhsd
    assert strides_like(t, (2, 3, 5, 8)) == [5 * 3 * 8, 8, 3 * 8, 1]


def test_in_place_change_of_a_score_mod_tensor_before_backward_is_an_error():
    q, k, v = meta_qkv()
    bias = torch.empty(1, 2, 16, 16, device="meta")
    out, lse = torch.ops.cudnn_flex.fwd(q, k, v, [bias], [], 1, 0, True, 0.125, False, [], [], [])
    bias.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_backward_twice_without_retain_graph_is_an_error():
    q, k, v = meta_qkv()
    out, lse = fake_fwd(q, k, v)
    out.sum().backward(retain_graph=False)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
