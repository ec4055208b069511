"""The shortcut of a repeated flex_attention_varlen call (fast_path.py) and the ragged offsets the
op remembers per cu_seqlens version (csrc/ragged_offsets.h), on cuDNN: a call by the shortcut
computes what the reference path computes (out, lse, dq, dk, dv against float64), after
cu_seqlens change in place or are freed and made again, and with NaN left in the memory of the
outputs' rows cuDNN does not write (lse past each sequence, out and dq of a query without keys)."""

import gc

import pytest
import torch

import cudnn_flex
from cudnn_flex import varlen
from gpu_cases import check
from length_mods import H, MODS, cu_seqlens
from record_counter import count_records

pytestmark = pytest.mark.gpu

H_KV, D = 2, 64

PACKINGS = {  # (query lengths, key lengths)
    "tile edges and an empty one": ([1, 127, 129, 0, 300], [1, 127, 129, 0, 300]),
    "cross lengths, a query without keys": ([5, 200, 129, 64, 3], [133, 7, 300, 64, 0]),
    "keys without a query": ([5, 0, 129, 0], [7, 64, 100, 1]),
}


@pytest.fixture
def records(monkeypatch):
    """How many flex_attention_varlen calls took the full path (recorded their mods)."""
    count = count_records(monkeypatch, varlen)
    cudnn_flex.clear_cache()
    return count




def poison(*blocks):
    """Leaves NaN in freed blocks of the caching allocator of these (shape, dtype), so that an
    output allocated next at that size starts as NaN where nothing writes it."""
    held = [torch.full(shape, float("nan"), device="cuda", dtype=dtype) for shape, dtype in blocks]
    del held


def run(lengths_q, lengths_kv, mod, cu_q, cu_kv, seed, device="cuda", dtype=torch.bfloat16, kwargs=None):
    """out, lse and the three gradients of one packed call on fresh inputs rounded to bfloat16
    (float64, CPU). On the GPU, the blocks its outputs take are NaN first: out and dq for a query
    without keys, dk and dv for keys without a query, the lse rows past each sequence."""
    g = torch.Generator().manual_seed(seed)
    rounded = lambda *shape: torch.randn(shape, generator=g).to(torch.bfloat16).to(device, dtype)  # noqa: E731
    q, k, v = (rounded(sum(n), h, D).requires_grad_()
               for n, h in ((lengths_q, H), (lengths_kv, H_KV), (lengths_kv, H_KV)))
    d_out = rounded(sum(lengths_q), H, D)
    if device == "cuda":
        poison(((len(lengths_q), H, max(max(lengths_q), 2)), torch.float32), *[((sum(lengths_q), H, D), dtype)] * 3,
               *[((sum(lengths_kv), H_KV, D), dtype)] * 2)
    out, lse = cudnn_flex.flex_attention_varlen(q, k, v, cu_q, cu_kv, **(kwargs or MODS[mod][0](device)),
                                                max_seqlen_q=max(lengths_q), max_seqlen_kv=max(lengths_kv),
                                                return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    return {name: t.detach().double().cpu() for name, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads)}


def reference(lengths_q, lengths_kv, mod, seed):
    return run(lengths_q, lengths_kv, mod, cu_seqlens(lengths_q), cu_seqlens(lengths_kv), seed, "cpu",
               torch.float64)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("mod", MODS)  # alibi's slopes in a closure; the DSL alibi's in score_mod_tensors
def test_a_packed_call_by_the_shortcut_matches_the_reference(records, mod, packing):
    lengths_q, lengths_kv = PACKINGS[packing]
    cu_q, cu_kv = cu_seqlens(lengths_q, "cuda"), cu_seqlens(lengths_kv, "cuda")
    kwargs = MODS[mod][0]("cuda")  # the same mods for both calls (a factory's closures are new each time)
    for seed in (1, 2):  # the full path, then the shortcut, each on fresh inputs
        got = run(lengths_q, lengths_kv, mod, cu_q, cu_kv, seed, kwargs=kwargs)
        check(got, reference(lengths_q, lengths_kv, mod, seed), label=f"{mod} {packing} call {seed}")
    assert records[0] == 1, "the second call did not take the shortcut"


def test_cu_seqlens_changed_in_place_give_the_new_sequences(records):
    """The same tensors, new values: the shortcut and the op's remembered offsets follow them."""
    before, after = ([120, 80], [80, 120]), ([30, 170], [170, 30])  # one total, unequal lengths: packed
    cu_q, cu_kv = cu_seqlens(before[0], "cuda"), cu_seqlens(before[1], "cuda")
    run(*before, "causal", cu_q, cu_kv, seed=3)
    run(*before, "causal", cu_q, cu_kv, seed=3)
    cu_q.copy_(cu_seqlens(after[0]))
    cu_kv.copy_(cu_seqlens(after[1]))
    for seed in (4, 5):
        check(run(*after, "causal", cu_q, cu_kv, seed), reference(*after, "causal", seed), label=f"in place {seed}")
    assert records[0] == 2


def test_new_cu_seqlens_where_freed_ones_were():
    """A cu_seqlens tensor freed and another made at once (likely in the same memory, at
    version 0): its own offsets, never the freed one's."""
    for i, lengths in enumerate(([129, 71], [1, 199], [64, 136])):
        cu = cu_seqlens(lengths, "cuda")
        check(run(lengths, lengths, "none", cu, cu, seed=6 + i), reference(lengths, lengths, "none", 6 + i),
              label=f"{lengths}")
        del cu
        gc.collect()
