"""Padded batches (flex_attention's seq_lens_q / seq_lens_kv) and packed sequences
(flex_attention_varlen) on cuDNN: cuDNN's seq_len tensors with the padding mask in the score_mod
(padded_batch.py). Checked against the float64 formula with the padding masked: out, lse and the
three gradients, at lengths that fill no tile (1, 127, 129), empty sequences and GQA; the padding
gets out 0, lse -inf and no gradient."""

import pytest
import torch

import cudnn_flex
import oracle
from cudnn_flex import mods
from gpu_cases import check, formula_results, make_inputs, with_gradients
from length_mods import H, MODS, NEG_INF, SLOPES, cu_seqlens, where_kept

pytestmark = pytest.mark.gpu

H_KV, D = 2, 64

# (padded Sq, padded Skv, [(q length, kv length) per batch element])
SHAPES = {
    "129x133": (129, 133, [(1, 1), (127, 129), (129, 127), (0, 5), (5, 0), (64, 133)]),
    "300x300": (300, 300, [(300, 300), (129, 257), (1, 300), (256, 128)]),
}


def padded_formula_results(qkv, d_out, len_q, len_kv, formula) -> dict:
    """What with_gradients should give: the float64 formula with the padding masked (lengths int32
    [B] on the CPU)."""
    def padded(s, b, h, q_idx, kv_idx):
        return where_kept((kv_idx < len_kv.long()[b]) & (q_idx < len_q.long()[b]), formula(s, b, h, q_idx, kv_idx))

    return formula_results(qkv, d_out, padded)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mod", MODS)
def test_padded_batch_matches_its_formula(mod, shape):
    s_q, s_kv, lengths = SHAPES[shape]
    kwargs, formula = MODS[mod]
    q, k, v = make_inputs(b=len(lengths), h=H, h_kv=H_KV, s_q=s_q, s_kv=s_kv, d=D, seed=11)
    len_q = torch.tensor([n for n, _ in lengths], dtype=torch.int32)
    len_kv = torch.tensor([n for _, n in lengths], dtype=torch.int32)
    out, lse = cudnn_flex.flex_attention(q, k, v, **kwargs("cuda"), seq_lens_q=len_q.cuda(),
                                         seq_lens_kv=len_kv.cuda(), return_lse=True)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to("cuda", out.dtype)
    got = with_gradients(out, lse, (q, k, v), d_out)
    check(got, padded_formula_results((q, k, v), d_out, len_q, len_kv, formula), label=f"{mod} {shape}")
    for i, (n_q, n_kv) in enumerate(lengths):  # the padding: exactly nothing
        assert torch.all(got["out"][i, :, n_q:] == 0) and torch.all(got["lse"][i, :, n_q:] == NEG_INF)
        assert torch.all(got["dq"][i, :, n_q:] == 0)
        assert torch.all(got["dk"][i, :, n_kv:] == 0) and torch.all(got["dv"][i, :, n_kv:] == 0)


def poison_free_blocks(*like) -> None:
    """Leaves NaN in the caching allocator's free blocks of the sizes of these (shape, dtype): a row
    the op then leaves unwritten reads NaN, not a lucky zero of a fresh block. Eight of each, so
    that the op's allocations find poisoned blocks of their size first."""
    held = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in like for _ in range(8)]
    del held


# (padded Sq, padded Skv, query lengths or None (not given), key lengths): where every query row
# lies inside its sequence and has a key the op skips clearing out and lse (the values, read on
# the host, say so), and cuDNN must write every row itself; one empty cache beside full ones.
EVERY_ROW_CASES = {
    "decode": (1, 133, None, [1, 77, 129, 133]),
    "127 rows, q given full": (127, 133, [127] * 4, [1, 127, 129, 133]),
    "129 rows, kv only": (129, 133, None, [129, 1, 133, 128]),
    "an empty cache": (129, 133, None, [0, 1, 129, 133]),
}


@pytest.mark.parametrize("case", EVERY_ROW_CASES)
@pytest.mark.parametrize("mod", MODS)
def test_rows_the_op_does_not_clear_are_written(mod, case):
    """Forward and backward against the float64 formula, out's and lse's blocks poisoned with NaN
    before each call; a row without keys gets out 0 and lse -inf."""
    s_q, s_kv, q_lengths, kv_lengths = EVERY_ROW_CASES[case]
    b = len(kv_lengths)
    kwargs, formula = MODS[mod]
    q, k, v = make_inputs(b=b, h=H, h_kv=H_KV, s_q=s_q, s_kv=s_kv, d=D, seed=16)
    len_kv = torch.tensor(kv_lengths, dtype=torch.int32)
    len_q = torch.tensor(q_lengths or [s_q] * b, dtype=torch.int32)
    given = {"seq_lens_kv": len_kv.cuda()} | ({} if q_lengths is None else {"seq_lens_q": len_q.cuda()})
    d_out = torch.randn(b, H, s_q, D, generator=torch.Generator().manual_seed(6)).to("cuda", q.dtype)
    want = padded_formula_results((q, k, v), d_out, len_q, len_kv, formula)
    for _ in range(2):  # the full path, then the shortcut
        poison_free_blocks(((b, H, s_q, D), q.dtype), ((b, H, s_q), torch.float32))
        out, lse = cudnn_flex.flex_attention(q, k, v, **kwargs("cuda"), **given, return_lse=True)
        got = with_gradients(out, lse, (q, k, v), d_out)
        check(got, want, label=f"{mod} {case}")
        for i, n_kv in enumerate(kv_lengths):
            if n_kv == 0:
                assert torch.all(got["out"][i] == 0) and torch.all(got["lse"][i] == NEG_INF)


def test_a_captured_call_clears_rows_that_a_replay_leaves_without_keys():
    """At capture every cache is non-empty, but a replay runs on the values the lengths hold then:
    a cache emptied in place before a replay gets out 0 and lse -inf, not the last replay's rows."""
    q, k, v = (t.detach() for t in make_inputs(b=3, h=H, h_kv=H_KV, s_q=1, s_kv=129, d=D, seed=17))
    len_kv = torch.tensor([5, 129, 64], dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            cudnn_flex.flex_attention(q, k, v, seq_lens_kv=len_kv)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out, lse = cudnn_flex.flex_attention(q, k, v, seq_lens_kv=len_kv, return_lse=True)
    for lengths in ([5, 129, 64], [0, 129, 0], [7, 1, 129]):
        len_kv.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()

        def formula(s, b, h, q_idx, kv_idx):
            return where_kept(kv_idx < torch.tensor(lengths)[b], s)

        want_out, want_lse = oracle.attention(*(t.double().cpu() for t in (q, k, v)), formula)
        got = {"out": out.double().cpu(), "lse": lse.double().cpu()}
        check(got, {"out": want_out, "lse": want_lse}, label=f"replay {lengths}")
        for i, n in enumerate(lengths):
            if n == 0:
                assert torch.all(got["out"][i] == 0) and torch.all(got["lse"][i] == NEG_INF)


def test_a_decode_step_launches_no_clearing():
    """Where every query row attends the op clears nothing: a padded decode step launches the
    memsets an unpadded call does; with an empty cache, more (the op's out and lse: the profiler
    lists 3 events for them on the H200)."""
    q, k, v = (t.detach() for t in make_inputs(b=2, h=H, h_kv=H_KV, s_q=1, s_kv=129, d=D, seed=18))

    def memsets(**lengths) -> int:
        with torch.no_grad():
            cudnn_flex.flex_attention(q, k, v, **lengths)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                cudnn_flex.flex_attention(q, k, v, **lengths)
                torch.cuda.synchronize()
        return sum("memset" in event.name.lower() for event in prof.events())

    unpadded = memsets()
    assert memsets(seq_lens_kv=torch.tensor([1, 129], dtype=torch.int32, device="cuda")) == unpadded
    assert memsets(seq_lens_kv=torch.tensor([0, 129], dtype=torch.int32, device="cuda")) > unpadded


def test_padding_values_do_not_reach_the_valid_rows():
    """What the padding holds changes no valid row: cuDNN reads the last partial tile, and its
    padding mask must keep those keys out. Finite values only: NaN in the padding reaches the
    valid rows on cuDNN (0 * NaN in P V; measured on the H200), as flex_attention documents."""
    lengths = [(100, 100), (129, 70)]
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=129, s_kv=133, d=D, seed=12)
    len_q = torch.tensor([n for n, _ in lengths], dtype=torch.int32, device="cuda")
    len_kv = torch.tensor([n for _, n in lengths], dtype=torch.int32, device="cuda")
    clean = cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal, seq_lens_q=len_q, seq_lens_kv=len_kv)
    dirty = [t.detach().clone() for t in (q, k, v)]
    for i, (n_q, n_kv) in enumerate(lengths):
        for t, n in zip(dirty, (n_q, n_kv, n_kv)):
            t[i, :, n:] = 1e4 * torch.randn_like(t[i, :, n:])
    out = cudnn_flex.flex_attention(*dirty, mask_mod=mods.causal, seq_lens_q=len_q, seq_lens_kv=len_kv)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


PACKINGS = {  # (query lengths, key lengths) of the packed sequences
    "tile edges and an empty one": ([1, 127, 129, 0, 300], [1, 127, 129, 0, 300]),
    "cross lengths": ([5, 200, 129, 64], [133, 7, 300, 64]),
}


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("layout", ["thd", "htd view", "packed kv"])
def test_packed_sequences_match_the_reference_path(mod, packing, layout):
    """flex_attention_varlen on cuDNN (ragged offsets into the packed tensors: read in place in
    any dimension order, copied when they have gaps) against the same call on the CPU reference path
    (float64), which test_varlen.py checks against one flex_attention call per sequence; out, lse
    and the three gradients."""
    lengths_q, lengths_kv = PACKINGS[packing]
    cu_q, cu_kv = cu_seqlens(lengths_q), cu_seqlens(lengths_kv)
    g = torch.Generator().manual_seed(13)
    host = [torch.randn(sum(n), h, D, generator=g).to(torch.bfloat16)
            for n, h in ((lengths_q, H), (lengths_kv, H_KV), (lengths_kv, H_KV))]
    d_out = torch.randn(sum(lengths_q), H, D, generator=g).to(torch.bfloat16)
    kwargs = MODS[mod][0]
    results = {}
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float64)):
        q, k, v = (t.to(device, dtype) for t in host)
        if layout == "htd view":  # [total, H, D] views of head-major storage
            q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q, k, v))
        elif layout == "packed kv":  # k and v are views of one [total, 2, H, D] projection
            q = q.requires_grad_()
            kv = torch.stack([k, v], dim=1).requires_grad_()
            k, v = kv[:, 0], kv[:, 1]
        else:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        out, lse = cudnn_flex.flex_attention_varlen(q, k, v, cu_q.to(device), cu_kv.to(device), **kwargs(device),
                                                    max_seqlen_q=max(lengths_q), max_seqlen_kv=max(lengths_kv),
                                                    return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), d_out.to(device, dtype))  # through the views
        results[device] = {name: t.detach().double().cpu() for name, t in
                           zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads)}
    errs = check(results["cuda"], results["cpu"], label=f"varlen {mod} {packing}")
    assert set(errs) == {"out", "lse", "dq", "dk", "dv"}


def test_a_padded_batch_builds_its_graphs_once():
    """The lengths are runtime data: new lengths reuse the graphs (no rebuild per batch)."""
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=129, s_kv=129, d=D, seed=14)
    cudnn_flex.flex_attention(q, k, v, seq_lens_q=torch.tensor([3, 129], dtype=torch.int32, device="cuda"),
                              seq_lens_kv=torch.tensor([3, 129], dtype=torch.int32, device="cuda")).sum().backward()
    builds = cudnn_flex.cache_stats()["builds"]
    for n in (1, 64, 128):
        lengths = torch.tensor([n, 129 - n], dtype=torch.int32, device="cuda")
        cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths, seq_lens_kv=lengths).sum().backward()
    assert cudnn_flex.cache_stats()["builds"] == builds


def test_a_gradient_through_packed_lse_is_refused_by_name():
    lengths = [3, 129]
    cu = torch.tensor([0, 3, 132], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(132, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (H, H_KV, H_KV))
    out, lse = cudnn_flex.flex_attention_varlen(q, k, v, cu, cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths),
                                                return_lse=True)
    out.float().sum().backward()  # out alone: fine
    assert q.grad is not None
    out, lse = cudnn_flex.flex_attention_varlen(q, k, v, cu, cu, max_seqlen_q=129, max_seqlen_kv=129, return_lse=True)
    with pytest.raises(NotImplementedError, match="lse of packed sequences"):
        lse.sum().backward()


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi bottom-right"])
def test_decoding_against_per_batch_cache_lengths(alibi):
    """One new query per batch element against a KV cache of per-batch length (seq_lens_kv), the
    query sitting after its cache's last key (bottom-right): plain, and with ALiBi distances
    measured from that position through a captured lengths tensor. Forward only (inference)."""
    cache = [1, 129, 300, 77]
    q, k, v = make_inputs(b=len(cache), h=H, h_kv=H_KV, s_q=1, s_kv=300, d=D, seed=15)
    len_kv = torch.tensor(cache, dtype=torch.int32, device="cuda")
    slopes = SLOPES.view(-1).cuda()
    position = (len_kv - 1).long()  # the new query's position in its sequence

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - (q_idx + position[b]))

    with torch.no_grad():
        out, lse = cudnn_flex.flex_attention(q, k, v, alibi_mod if alibi else None, seq_lens_kv=len_kv,
                                             return_lse=True)
    slopes_cpu, position_cpu = SLOPES.view(-1).double(), position.cpu()

    def formula(s, b, h, q_idx, kv_idx):
        s = s + slopes_cpu[h] * (kv_idx - (q_idx + position_cpu[b])) if alibi else s
        return where_kept(kv_idx < len_kv.cpu().long()[b], s)

    want_out, want_lse = oracle.attention(*(t.detach().double().cpu() for t in (q, k, v)), formula)
    got = {"out": out.double().cpu(), "lse": lse.double().cpu()}
    check(got, {"out": want_out, "lse": want_lse}, label=f"decode alibi={alibi}")


# cuDNN 9.19 evaluates kv_idx, and h under GQA, wrongly inside a score_mod when the query dim is 1
# (measured on the H200: out off by 0.37, lse by 0.5); cudnn-flex runs such calls with two rows.
ONE_QUERY_MODS = {
    "key distance": lambda s, b, h, q, kv: s + 0.01 * (kv - q),
    "head bias": lambda s, b, h, q, kv: s + 0.5 * h,
    "causal bottom-right": lambda s, b, h, q, kv: torch.where(q + 150 >= kv, s, NEG_INF),
}


@pytest.mark.parametrize("h_kv", [H, H_KV, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mod", ONE_QUERY_MODS)
def test_one_query_with_index_score_mods(mod, h_kv):
    fn = ONE_QUERY_MODS[mod]
    q, k, v = make_inputs(b=3, h=H, h_kv=h_kv, s_q=1, s_kv=300, d=D, seed=16)
    out, lse = cudnn_flex.flex_attention(q, k, v, fn, return_lse=True)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to("cuda", out.dtype)
    check(with_gradients(out, lse, (q, k, v), d_out), formula_results((q, k, v), d_out, fn),
          label=f"one query {mod}")
    assert out.shape == (3, H, 1, D) and lse.shape == (3, H, 1)


def test_packed_decoding_one_query_per_sequence():
    """flex_attention_varlen with one query per sequence (the query dim runs as 2) and a key
    distance bias, against the CPU reference path."""
    lengths_kv = [1, 129, 300, 77]
    cu_q = torch.arange(5, dtype=torch.int32)
    cu_kv = cu_seqlens(lengths_kv)
    g = torch.Generator().manual_seed(17)
    host = [torch.randn(n, h, D, generator=g).to(torch.bfloat16) for n, h in ((4, H), (sum(lengths_kv), H_KV),
                                                                             (sum(lengths_kv), H_KV))]
    fn = ONE_QUERY_MODS["key distance"]
    results = {}
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float64)):
        q, k, v = (t.to(device, dtype) for t in host)
        out, lse = cudnn_flex.flex_attention_varlen(q, k, v, cu_q.to(device), cu_kv.to(device), fn, max_seqlen_q=1,
                                                    max_seqlen_kv=300, return_lse=True)
        results[device] = {"out": out.double().cpu(), "lse": lse.double().cpu()}
    check(results["cuda"], results["cpu"], label="packed decoding")


@pytest.mark.parametrize("split", [[0, 100, 200], [0, 60, 200]], ids=["all full at capture", "uneven"])
@pytest.mark.parametrize("masked", [False, True], ids=["no mod", "causal"])
def test_a_captured_varlen_call_follows_new_cu_seqlens_on_replay(masked, split):
    """Servers capture a step with static buffers and update cu_seqlens in place: every replay
    must use the new boundaries (the lengths and ragged offsets are computed inside the graph, an
    all-full split at capture is no shortcut baked into it, and an uneven warm-up on the capture's
    own stream leaves nothing the capture may reuse: neither the call's shortcut nor the op's
    remembered offsets). Out and lse against an eager call per split."""
    total = 200
    kwargs = {"mask_mod": mods.causal} if masked else {}
    q, k, v = (torch.randn(total, h, D, device="cuda", dtype=torch.bfloat16) for h in (H, H_KV, H_KV))
    cu = torch.tensor(split, dtype=torch.int32, device="cuda")
    run = lambda: cudnn_flex.flex_attention_varlen(q, k, v, cu, cu, max_seqlen_q=total, max_seqlen_kv=total,  # noqa: E731
                                                   return_lse=True, **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up: builds the graphs, checks cu_seqlens on the host
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out, lse = run()
    for split in ([0, 37, 200], [0, 1, 200], [0, 129, 200], [0, 100, 200]):
        cu.copy_(torch.tensor(split, dtype=torch.int32))
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        want_out, want_lse = cudnn_flex.flex_attention_varlen(q, k, v, cu.clone(), cu.clone(), return_lse=True,
                                                              **kwargs)
        torch.testing.assert_close(out, want_out, atol=2e-2, rtol=2e-2, msg=lambda m: f"split {split}: {m}")
        torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3, msg=lambda m: f"split {split}: {m}")


CAPTURE_REFUSALS = {  # name -> (dtype, warm-up max_seqlen, captured max_seqlen, message)
    "no max_seqlen": (torch.bfloat16, None, None, "under CUDA graph capture, pass max_seqlen_q"),
    "not warmed up with that max_seqlen": (torch.bfloat16, None, 40,
                                           r"cu_seqlens_q was not checked with max_seqlen_q=40 since its last change"),
    "float32 (the reference path)": (torch.float32, 40, 40, "under CUDA graph capture takes float16/bfloat16"),
}


@pytest.mark.parametrize("case", CAPTURE_REFUSALS)
def test_what_varlen_cannot_capture_is_refused_by_name(case):
    dtype, warm, captured, message = CAPTURE_REFUSALS[case]
    q = torch.randn(40, H, D, device="cuda", dtype=dtype)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device="cuda")
    cudnn_flex.flex_attention_varlen(q, q, q, cu, cu, max_seqlen_q=warm, max_seqlen_kv=warm)  # warm-up
    with pytest.raises(ValueError, match=message):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            cudnn_flex.flex_attention_varlen(q, q, q, cu, cu, max_seqlen_q=captured, max_seqlen_kv=captured)
