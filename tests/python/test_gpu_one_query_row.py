"""One query row (a decode step) on cuDNN: programs that read neither the head nor the key index
(the score, q_idx, b, score_mod tensors) run one row; those that read one run as two rows
(_ops.needs_two_rows). Checked against the float64 formula: out, lse and the three gradients (out
and lse without a backward), MHA and GQA, key lengths that fill no tile up to a cache of 2048,
unpadded and padded (per-batch cache lengths, seq_lens_kv), captured in a CUDA graph; and the
query rows the op got."""

import pytest
import torch

import cudnn_flex
import oracle
from cudnn_flex import _ops, dsl_mods, mods
from gpu_cases import check, formula_results, make_inputs, with_gradients
from length_mods import where_kept

pytestmark = pytest.mark.gpu

B, H, D = 3, 8, 64
SOFTCAP = dsl_mods.softcap(20.0)
KV_BIAS = torch.randn(2048, generator=torch.Generator().manual_seed(3))
HEAD_BIAS = torch.randn(H, generator=torch.Generator().manual_seed(4))
FULL_BIAS = torch.randn(B, H, 1, 2048, generator=torch.Generator().manual_seed(5))
# Which keys each batch element may see (an attention mask as Hugging Face passes it); the second
# sees none: its row is fully masked (out 0, lse -inf, no gradient).
KEEP = torch.rand(B, 2048, generator=torch.Generator().manual_seed(6)) < 0.7
KEEP[1] = False


def captured_bias(table: torch.Tensor, index: str):
    """score + table[b], table[h] or table[kv_idx]: a tensor the mod closes over, indexed by an
    index variable (a view of it reaches cuDNN, no index computed in the kernel)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[{"b": b, "h": h, "kv": kv_idx}[index]]
    return score_mod


def key_mask(keep: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]
    return mask_mod


def add_full_bias(graph, score, tensors):
    return graph.add(score, tensors["bias"])


# name -> (flex_attention kwargs on the GPU for s_kv keys, the formula of the scores for s_kv keys)
MODS = {
    "softcap": (lambda s_kv: dict(score_mod=mods.softcap(20.0)),
                lambda s_kv: lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)),
    "dsl softcap with its bprop": (lambda s_kv: dict(score_mod=SOFTCAP.forward, score_mod_bprop=SOFTCAP.backward),
                                   lambda s_kv: lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)),
    "query position": (lambda s_kv: dict(score_mod=lambda s, b, h, q_idx, kv_idx: s * 0.5 + 0.3 * q_idx),
                       lambda s_kv: lambda s, b, h, q, kv: s * 0.5 + 0.3 * q),
    "key bias tensor": (lambda s_kv: dict(score_mod=captured_bias(KV_BIAS[:s_kv].cuda(), "kv")),
                        lambda s_kv: lambda s, b, h, q, kv: s + KV_BIAS[:s_kv].double()[kv]),
    "head bias tensor": (lambda s_kv: dict(score_mod=captured_bias(HEAD_BIAS.cuda(), "h")),
                         lambda s_kv: lambda s, b, h, q, kv: s + HEAD_BIAS.double()[h]),
    "batch index": (lambda s_kv: dict(score_mod=lambda s, b, h, q_idx, kv_idx: s + 0.3 * b),
                    lambda s_kv: lambda s, b, h, q, kv: s + 0.3 * b),
    "key mask tensor, a row fully masked": (lambda s_kv: dict(mask_mod=key_mask(KEEP[:, :s_kv].cuda())),
                                            lambda s_kv: lambda s, b, h, q, kv: where_kept(KEEP[:, :s_kv][b, kv], s)),
    "batch bias tensor": (lambda s_kv: dict(score_mod=captured_bias(HEAD_BIAS[:B].cuda(), "b")),
                          lambda s_kv: lambda s, b, h, q, kv: s + HEAD_BIAS[:B].double()[b]),
    "dsl full bias": (lambda s_kv: dict(score_mod=add_full_bias,
                                        score_mod_tensors={"bias": FULL_BIAS[..., :s_kv].contiguous().cuda()}),
                      lambda s_kv: lambda s, b, h, q, kv: s + FULL_BIAS[..., :s_kv].double()),
}


class RowsSeen:
    """The extension, recording the query rows of each forward it runs."""

    def __init__(self, real):
        self.real, self.rows = real, []

    def fwd(self, q, *args):
        self.rows.append(q.shape[2])
        return self.real.fwd(q, *args)


@pytest.fixture
def rows_seen(monkeypatch):
    seen = RowsSeen(_ops._C)
    monkeypatch.setattr(_ops, "_C", seen)
    return seen


def _results(q, k, v, d_out, kwargs) -> dict:
    out, lse = cudnn_flex.flex_attention(q, k, v, **kwargs, return_lse=True)
    return with_gradients(out, lse, (q, k, v), d_out)


@pytest.mark.parametrize("s_kv", [2, 127, 129, 2048])
@pytest.mark.parametrize("h_kv", [H, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("mod", MODS)
def test_one_query_row_matches_its_formula(mod, h_kv, s_kv, rows_seen):
    kwargs, formula = (make(s_kv) for make in MODS[mod])
    q, k, v = make_inputs(b=B, h=H, h_kv=h_kv, s_q=1, s_kv=s_kv, d=D, seed=s_kv + h_kv)
    d_out = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(7)).to("cuda", q.dtype)
    for call in range(2):  # the full path, then the shortcut
        got = _results(q, k, v, d_out, kwargs)
        check(got, formula_results((q, k, v), d_out, formula), label=f"{mod} 1x{s_kv} h_kv={h_kv} call {call}")
    assert rows_seen.rows == [1, 1]


@pytest.mark.parametrize("mod", MODS)
def test_a_padded_decode_step_matches_its_formula(mod, rows_seen):
    """One query per batch element against per-batch cache lengths (seq_lens_kv), GQA."""
    cache = [1, 77, 2000]
    kwargs, formula = (make(2048) for make in MODS[mod])
    q, k, v = make_inputs(b=B, h=H, h_kv=2, s_q=1, s_kv=2048, d=D, seed=8)
    lengths = torch.tensor(cache, dtype=torch.int32, device="cuda")
    d_out = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(9)).to("cuda", q.dtype)
    scores = formula

    def padded(s, b, h, q_idx, kv_idx):
        return where_kept(kv_idx < torch.tensor(cache)[b], scores(s, b, h, q_idx, kv_idx))

    for call in range(2):
        got = _results(q, k, v, d_out, dict(kwargs, seq_lens_kv=lengths))
        check(got, formula_results((q, k, v), d_out, padded), label=f"{mod} padded call {call}")
    assert rows_seen.rows == [1, 1]


def add_key_distance(graph, score, tensors):
    """score + 0.01 * (kv_idx - q_idx): reads the key index, so one row runs as two."""
    distance = graph.sub(graph.gen_index(score, 3), graph.gen_index(score, 2))
    return graph.add(score, graph.mul(distance, 0.01))


# name -> (score_mod, score_mod_bprop, formula): DSL mods (torch-style ones compile from torch 2.14 on)
COMPILED = {
    "dsl softcap with its bprop": (SOFTCAP.forward, SOFTCAP.backward,
                                   lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)),
    "dsl key distance": (add_key_distance, None, lambda s, b, h, q, kv: s + 0.01 * (kv - q)),
}


@pytest.mark.parametrize("mod", COMPILED)
def test_a_compiled_decode_step_matches_its_formula(mod):
    """Under torch.compile the op learns from the recorded ids whether the program reads the head
    or key index (record_call): one row as one for the softcap, as two for the key distance."""
    score_mod, bprop, formula = COMPILED[mod]
    q, k, v = make_inputs(b=B, h=H, h_kv=2, s_q=1, s_kv=2048, d=D, seed=10)
    d_out = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(11)).to("cuda", q.dtype)

    @torch.compile(fullgraph=True)
    def attend(q, k, v):
        return cudnn_flex.flex_attention(q, k, v, score_mod, bprop, return_lse=True)

    out, lse = attend(q, k, v)
    check(with_gradients(out, lse, (q, k, v), d_out), formula_results((q, k, v), d_out, formula),
          label=f"compiled {mod}")


# ---------------------------------------------------------------------------------------------
# Without a backward, programs that read the head or key index: two rows, the second a copy of the
# first. (Reading those indices from int32 tensors at one row was tried and gave a wrong ALiBi with
# per-batch positions on cuDNN 9.19: docs/benchmarks.md, fifteenth session.)

SLOPES = mods.alibi_slopes(H).view(-1)
DISTANCE_TABLE = torch.randn(H, 4096, generator=torch.Generator().manual_seed(12))


def relative_table(table: torch.Tensor):
    """score + table[h, kv_idx - q_idx + 2048]: a learned bias per head and distance (T5-like),
    gathered ahead of the kernel."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx - q_idx + 2048]
    return score_mod


def recent_keys(s_kv: int):
    """The last 100 keys of the cache: a window written over kv_idx alone (no band)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx >= s_kv - 100
    return mask_mod


# name -> (flex_attention kwargs on the GPU for s_kv keys, the formula of the scores for s_kv keys)
INDEX_MODS = {
    "alibi": (lambda s_kv: dict(score_mod=mods.alibi(SLOPES.cuda())),
              lambda s_kv: lambda s, b, h, q, kv: s + SLOPES.double()[h] * (kv - q)),
    "dsl alibi": (lambda s_kv: dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": SLOPES.view(1, H, 1, 1).cuda()}),
                  lambda s_kv: lambda s, b, h, q, kv: s + SLOPES.double()[h] * (kv - q)),
    "key distance": (lambda s_kv: dict(score_mod=lambda s, b, h, q_idx, kv_idx: s + 0.01 * (kv_idx - q_idx)),
                     lambda s_kv: lambda s, b, h, q, kv: s + 0.01 * (kv - q)),
    "head index": (lambda s_kv: dict(score_mod=lambda s, b, h, q_idx, kv_idx: s + 0.3 * h),
                   lambda s_kv: lambda s, b, h, q, kv: s + 0.3 * h),
    "dsl relative bias": (lambda s_kv: dict(score_mod=dsl_mods.relative_bias(0.05)),
                          lambda s_kv: lambda s, b, h, q, kv: s + 0.05 * (q - kv)),
    "relative table": (lambda s_kv: dict(score_mod=relative_table(DISTANCE_TABLE.cuda())),
                       lambda s_kv: lambda s, b, h, q, kv: s + DISTANCE_TABLE.double()[h, kv - q + 2048]),
    "softcap and alibi": (lambda s_kv: dict(score_mod=mods.compose(mods.softcap(20.0), mods.alibi(SLOPES.cuda()))),
                          lambda s_kv: lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0) + SLOPES.double()[h] * (kv - q)),
    "keys below 64": (lambda s_kv: dict(mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < 64),
                      lambda s_kv: lambda s, b, h, q, kv: where_kept(kv < 64, s)),
    "recent keys": (lambda s_kv: dict(mask_mod=recent_keys(s_kv)),
                    lambda s_kv: lambda s, b, h, q, kv: where_kept(kv >= s_kv - 100, s)),
    "keys by head": (lambda s_kv: dict(mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < 50 + 10 * h),
                     lambda s_kv: lambda s, b, h, q, kv: where_kept(kv < 50 + 10 * h, s)),
}


def _forward(q, k, v, kwargs) -> dict:
    with torch.no_grad():
        out, lse = cudnn_flex.flex_attention(q, k, v, **kwargs, return_lse=True)
    return {"out": out.double().cpu(), "lse": lse.double().cpu()}


def _formula_forward(q, k, v, formula) -> dict:
    out, lse = oracle.attention(*(t.detach().double().cpu() for t in (q, k, v)), formula)
    return {"out": out, "lse": lse}


@pytest.mark.parametrize("s_kv", [2, 127, 129, 2048])
@pytest.mark.parametrize("h_kv", [H, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("mod", INDEX_MODS)
def test_a_decode_step_reading_the_head_or_key_index_without_a_backward(mod, h_kv, s_kv, rows_seen):
    kwargs, formula = (make(s_kv) for make in INDEX_MODS[mod])
    q, k, v = make_inputs(b=B, h=H, h_kv=h_kv, s_q=1, s_kv=s_kv, d=D, seed=s_kv + h_kv + 20)
    want = _formula_forward(q, k, v, formula)
    for call in range(2):  # the full path, then the shortcut
        check(_forward(q, k, v, kwargs), want, label=f"{mod} 1x{s_kv} h_kv={h_kv} call {call}")
    assert rows_seen.rows == [2, 2]


@pytest.mark.parametrize("mod", ["alibi", "keys by head"])
def test_a_padded_decode_step_reading_the_key_index(mod, rows_seen):
    """Per-batch cache lengths (seq_lens_kv) over a cache of 2048, GQA, in inference mode."""
    cache = [1, 77, 2000]
    kwargs, formula = (make(2048) for make in INDEX_MODS[mod])
    q, k, v = (t.detach() for t in make_inputs(b=B, h=H, h_kv=2, s_q=1, s_kv=2048, d=D, seed=21))
    lengths = torch.tensor(cache, dtype=torch.int32, device="cuda")

    def padded(s, b, h, q_idx, kv_idx):
        return where_kept(kv_idx < torch.tensor(cache)[b], formula(s, b, h, q_idx, kv_idx))

    want = _formula_forward(q, k, v, padded)
    for call in range(2):
        with torch.inference_mode():
            out, lse = cudnn_flex.flex_attention(q, k, v, **kwargs, seq_lens_kv=lengths, return_lse=True)
        check({"out": out.double().cpu(), "lse": lse.double().cpu()}, want, label=f"{mod} padded call {call}")
    assert rows_seen.rows == [2, 2]


def test_a_captured_decode_step_replays_its_formula(rows_seen):
    """A decode step of ALiBi captured in a CUDA graph after a warm-up step (two rows, the second
    row a copy made inside the graph): each replay reads the q then in place, and matches the
    formula."""
    kwargs, formula = (make(2048) for make in INDEX_MODS["alibi"])
    q, k, v = (t.detach() for t in make_inputs(b=B, h=H, h_kv=2, s_q=1, s_kv=2048, d=D, seed=24))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _forward(q, k, v, kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = cudnn_flex.flex_attention(q, k, v, **kwargs)
    assert rows_seen.rows == [2, 2]
    for seed in (25, 26):
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        check({"out": out.double().cpu()}, {"out": _formula_forward(q, k, v, formula)["out"]},
              label=f"replay {seed}")
