"""The shortcut of a repeated call (fast_path.py) with score_mod tensors and padded lengths, on cuDNN:
each repeat reads this call's tensors and lengths (new tensors, values written in place, a CUDA
graph replayed over new lengths), checked against oracle.attention in float64 for out, lse and the
three gradients, at lengths that fill no tile."""

import pytest
import torch

import cudnn_flex
import oracle
from cudnn_flex import dsl_mods, mods
from dsl_tensor_mods import masked_by, same_document, scaled_by, scaled_by_bprop
from gpu_cases import check, compare, make_inputs
from oracle import NEG_INF
from record_counter import records  # noqa: F401  (a fixture)

pytestmark = pytest.mark.gpu

SHAPES = [(1, 129), (127, 127), (129, 64)]
H, H_KV = 4, 2


@pytest.mark.parametrize("s_q,s_kv", SHAPES)
def test_new_slopes_on_every_call(records, s_q, s_kv):
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=s_q, s_kv=s_kv, seed=s_q)
    for factor in (1.0, -2.0, 0.5):
        slopes = (mods.alibi_slopes(H) * factor).view(1, H, 1, 1).cuda()
        ref = slopes.double().cpu()
        got, want = compare(q, k, v, lambda s, b, h, qi, kv: s + ref * (kv - qi),
                            score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": slopes})
        check(got, want, label=f"slopes x{factor} {s_q}x{s_kv}")
    assert records[0] == 1, "the repeats did not take the shortcut"


@pytest.mark.parametrize("s_q,s_kv", SHAPES)
def test_a_bias_written_in_place_between_calls(records, s_q, s_kv):
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=s_q, s_kv=s_kv, seed=3)
    bias = torch.randn(2, H, s_q, s_kv, device="cuda")
    for step in range(2):
        ref = bias.double().cpu()
        got, want = compare(q, k, v, lambda s, b, h, qi, kv: s + ref, score_mod=dsl_mods.add_bias,
                            score_mod_tensors={"bias": bias})
        check(got, want, label=f"bias step {step} {s_q}x{s_kv}")
        bias.mul_(-3.0)
    assert records[0] == 1


@pytest.mark.parametrize("s_q,s_kv", SHAPES)
def test_a_bool_mask_changed_between_calls(records, s_q, s_kv):
    """Converted to float32 on every call (as the full path does): the second call's mask is read."""
    q, k, v = make_inputs(b=1, h=H, h_kv=H_KV, s_q=s_q, s_kv=s_kv, seed=4)
    generator = torch.Generator().manual_seed(s_kv)
    keep = torch.rand(1, 1, s_q, s_kv, generator=generator) < 0.7
    keep[..., 0] = True  # no row fully masked
    keep = keep.cuda()
    for step in range(2):
        ref = keep.cpu()
        got, want = compare(q, k, v, lambda s, b, h, qi, kv: torch.where(ref, s, NEG_INF), score_mod=masked_by,
                            score_mod_tensors={"keep": keep})
        check(got, want, label=f"mask step {step} {s_q}x{s_kv}")
        keep[..., 1:] = ~keep[..., 1:]
    assert records[0] == 1


def _bad_bias(kind: str, good: torch.Tensor):
    """(a bias the full path refuses, its error): each is left to the op by the shortcut, which must
    refuse it as well (ops.cpp, graph_inputs)."""
    if kind == "misaligned":
        return torch.randn(good.numel() + 1, device="cuda")[1:].view(good.shape), "is not 16-byte aligned"
    if kind == "shape":
        return torch.randn(good.shape[:2] + (good.shape[2] - 1, good.shape[3]), device="cuda"), "does not broadcast"
    if kind == "five dims":
        return good[None], "does not broadcast"
    if kind == "host tensor":
        return good.cpu(), "is on cpu but q is on cuda"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["misaligned", "shape", "five dims", "host tensor"])
def test_a_bad_tensor_on_a_repeat_gets_the_full_paths_error(records, kind):
    """The shortcut leaves a given tensor's alignment, device and shape to the op: the op refuses
    what the full path refuses, which then says what is wrong; the next good call is right."""
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=129, s_kv=127, seed=5)
    bias = torch.randn(2, H, 129, 127, device="cuda")
    for step in range(2):
        ref = bias.double().cpu()
        got, want = compare(q, k, v, lambda s, b, h, qi, kv: s + ref, score_mod=dsl_mods.add_bias,
                            score_mod_tensors={"bias": bias})
        check(got, want, label=f"call {step}")
    bad, message = _bad_bias(kind, bias)
    assert records[0] == 1, "the second call did not take the shortcut"
    with pytest.raises(ValueError, match=message):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.add_bias, score_mod_tensors={"bias": bad})
    assert records[0] == 2, "the error did not come from the full path"
    bias = torch.randn(2, H, 129, 127, device="cuda")
    ref = bias.double().cpu()
    got, want = compare(q, k, v, lambda s, b, h, qi, kv: s + ref, score_mod=dsl_mods.add_bias,
                        score_mod_tensors={"bias": bias})
    check(got, want, label=f"after a {kind} bias")
    assert records[0] == 2, "the good call after the error did not take the shortcut"


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_a_misaligned_tensor_of_a_copied_dtype_on_a_repeat_gets_the_full_paths_error(records, dtype):
    """The op is handed the aligned float32 copy of int64 or uint8 ids, so the shortcut checks the
    ids themselves, as the full path does."""
    s = 129
    q, k, v = make_inputs(b=1, h=H, h_kv=H_KV, s_q=s, s_kv=s, seed=9)
    ids = (torch.arange(s + 1, device="cuda") >= 60).to(dtype)
    good, bad = ids[:s], ids[1:]
    tensors = lambda i: {"q_doc": i.view(1, 1, s, 1), "kv_doc": i.view(1, 1, 1, s)}  # noqa: E731
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, same_document, score_mod_tensors=tensors(good))
    assert records[0] == 1, "the repeat did not take the shortcut"
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        cudnn_flex.flex_attention(q, k, v, same_document, score_mod_tensors=tensors(bad))


def test_bprop_tensors_on_the_shortcut(records):
    q, k, v = make_inputs(b=1, h=H, h_kv=H_KV, s_q=129, s_kv=127, seed=5)
    for c in (1.5, 0.25):
        scalar = {"c": torch.tensor(c)}
        got, want = compare(q, k, v, lambda s, b, h, qi, kv: s * c, score_mod=scaled_by, score_mod_bprop=scaled_by_bprop,
                            score_mod_tensors=scalar, score_mod_bprop_tensors=scalar)
        check(got, want, label=f"c={c}")
    assert records[0] == 1


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.float32])
def test_document_ids_as_score_mod_tensors(records, dtype):
    """Integer ids read by cuDNN as they are (only bool is converted): two documents per batch
    element, compared for equality in the graph; 129 positions, so that a uint8 row is of odd
    length."""
    s = 129
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=s, s_kv=s, seed=6)
    for split in (40, 100):
        ids = (torch.arange(s) >= split).to(dtype).expand(2, s).contiguous().cuda()
        ids[1] = (torch.arange(s) >= s - split).to(dtype)
        tensors = {"q_doc": ids.view(2, 1, s, 1), "kv_doc": ids.view(2, 1, 1, s)}
        ref = ids.cpu()
        formula = lambda sc, b, h, qi, kv: torch.where(ref[b, qi] == ref[b, kv], sc, NEG_INF)  # noqa: E731
        got, want = compare(q, k, v, formula, score_mod=same_document, score_mod_tensors=tensors)
        check(got, want, label=f"{dtype} split {split}")
    assert records[0] == 1


# --- padded lengths ---------------------------------------------------------------------------------


def padded_compare(q, k, v, len_q, len_kv, **kwargs):
    """(got, want) of a padded call: the formula of no mod with keys past len_kv[b] and rows past
    len_q[b] masked (a missing length is the full one)."""
    b, s_q, s_kv = q.shape[0], q.shape[2], k.shape[2]
    lq = torch.full((b,), s_q) if len_q is None else len_q.long().cpu()
    lkv = torch.full((b,), s_kv) if len_kv is None else len_kv.long().cpu()

    def formula(s, b_, h, qi, kv):
        return torch.where((kv < lkv[b_]) & (qi < lq[b_]), s, NEG_INF)
    return compare(q, k, v, formula, seq_lens_q=len_q, seq_lens_kv=len_kv, **kwargs)


@pytest.mark.parametrize("sides", ["kv", "both"])
@pytest.mark.parametrize("s_q,s_kv", SHAPES)
def test_lengths_on_the_shortcut(records, s_q, s_kv, sides):
    q, k, v = make_inputs(b=3, h=H, h_kv=H_KV, s_q=s_q, s_kv=s_kv, seed=7)
    len_kv = torch.tensor([s_kv, 1, s_kv // 2 + 1], dtype=torch.int32, device="cuda")
    len_q = torch.tensor([s_q, max(1, s_q - 1), 1], dtype=torch.int32, device="cuda") if sides == "both" else None
    for step in range(4):  # the full path, the shortcut, again after a write, and once more as checked
        got, want = padded_compare(q, k, v, len_q, len_kv)
        check(got, want, label=f"{sides} step {step} {s_q}x{s_kv}")
        if step == 1:
            len_kv.copy_(len_kv.flip(0))  # written in place: read again by the next call
    assert records[0] == 1


def test_a_cuda_graph_replays_a_padded_call_over_new_lengths(records):
    """A graph captured after the shortcut's calls (seq_lens_kv only: the queries' full side is the
    kept tensor) reads the lengths written before each replay."""
    q, k, v = (t.detach() for t in make_inputs(b=2, h=H, h_kv=H_KV, s_q=127, s_kv=129, seed=8))
    len_kv = torch.tensor([129, 64], dtype=torch.int32, device="cuda")
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, seq_lens_kv=len_kv)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, seq_lens_kv=len_kv)
    torch.cuda.current_stream().wait_stream(stream)
    for lengths in ([1, 129], [100, 3]):
        len_kv.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        want = cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, seq_lens_kv=len_kv.clone())
        assert torch.equal(out, want), lengths
        qf, kf, vf = (t.double().cpu() for t in (q, k, v))
        lk = torch.tensor(lengths)
        ref, _ = oracle.attention(qf, kf, vf, lambda s, b, h, qi, kv: torch.where((kv < lk[b]) & (kv <= qi), s, NEG_INF))
        assert (out.double().cpu() - ref).abs().max() < 2e-2, lengths
    assert records[0] == 1
