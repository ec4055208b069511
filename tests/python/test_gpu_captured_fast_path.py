"""The shortcut of a repeated call whose torch-style mods capture tensors (fast_path.py) on cuDNN:
`alibi(slopes)`, `document_mask(doc_ids)` and a bias table, as flex users write them. A call that
takes the shortcut computes what the formula says (out, lse and all three gradients against
oracle.attention in float64), also after the captured values change in place or the captured
tensor is replaced, and inside a CUDA graph."""

import pytest
import torch

import cudnn_flex
from cudnn_flex import mods
from gpu_cases import check, compare, make_inputs
import oracle
from oracle import ALIBI_SLOPES, NEG_INF
from record_counter import records  # noqa: F401  (a fixture)

pytestmark = pytest.mark.gpu

H = 4


def doc_ids(n: int, batch: int = 0) -> torch.Tensor:
    """Documents of 40 positions (the last shorter), numbered per batch element when batch > 0,
    where element b starts its first document b * 7 positions early."""
    if not batch:
        return torch.arange(n) // 40
    return torch.stack([(torch.arange(n) + 7 * b) // 40 for b in range(batch)])


def case(name: str, n: int):
    """(the call's mods, the captured tensor on the GPU, formula(captured on the CPU)) of a kind."""
    if name == "alibi":
        slopes = torch.tensor(ALIBI_SLOPES[H], device="cuda")
        return ({"score_mod": mods.alibi(slopes)}, slopes,
                lambda t: lambda s, b, h, q, kv: s + t.view(-1)[h] * (kv - q))
    if name.startswith("document ids"):  # int64 ids, torch's default, as flex users make them
        dtype = torch.int64 if "int64" in name else torch.int32
        ids = doc_ids(n, 2 if name.endswith("batch") else 0).to(device="cuda", dtype=dtype)
        if "at a stride" in name:  # every third element of a longer buffer
            ids = torch.zeros(3 * n + 2, device="cuda", dtype=dtype)[2::3].copy_(ids)
        index = (lambda t, b, i: t[i]) if ids.dim() == 1 else (lambda t, b, i: t[b, i])
        return ({"mask_mod": mods.document_mask(ids)}, ids,
                lambda t: lambda s, b, h, q, kv: torch.where(index(t, b, q) == index(t, b, kv), s, NEG_INF))
    if name == "bias table":
        table = torch.randn(H, n, n, device="cuda")

        def bias(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx, kv_idx]
        return {"score_mod": bias}, table, lambda t: lambda s, b, h, q, kv: s + t.double()[h, q, kv]
    raise KeyError(name)


KINDS = ["alibi", "document ids", "document ids per batch", "document ids, int64", "document ids, int64 at a stride",
         "bias table"]


def with_mods(kwargs):
    return lambda q, k, v, **options: cudnn_flex.flex_attention(q, k, v, **kwargs, **options)


@pytest.mark.parametrize("s_q,s_kv", [(1, 129), (127, 127), (129, 64)])
@pytest.mark.parametrize("kind", KINDS)
def test_a_call_by_the_shortcut_matches_the_formula(records, kind, s_q, s_kv):
    kwargs, captured, formula = case(kind, max(s_q, s_kv))
    q, k, v = make_inputs(b=2, h=H, h_kv=2, s_q=s_q, s_kv=s_kv, seed=s_q)
    cudnn_flex.flex_attention(q, k, v, **kwargs)  # the full path, remembered
    got, want = compare(q, k, v, formula(captured.cpu()), attention=with_mods(kwargs))
    assert records[0] == 1, "the second call did not take the shortcut"
    check(got, want, label=f"{kind} {s_q}x{s_kv}")


@pytest.mark.parametrize("kind", KINDS)
def test_values_written_in_place_are_read(records, kind):
    kwargs, captured, formula = case(kind, 129)
    q, k, v = make_inputs(b=2, h=H, s_q=129, s_kv=129, seed=5)
    for _ in range(2):  # the second by the shortcut, which keeps the views it may keep
        cudnn_flex.flex_attention(q, k, v, **kwargs)
    with torch.no_grad():
        captured.copy_(captured.flip(-1) * 2 if captured.is_floating_point() else captured.flip(-1))
    got, want = compare(q, k, v, formula(captured.cpu()), attention=with_mods(kwargs))
    assert records[0] == 1
    check(got, want, label=f"{kind} rewritten")


def test_a_replaced_storage_is_read(records):
    kwargs, slopes, formula = case("alibi", 129)
    q, k, v = make_inputs(b=1, h=H, s_q=129, s_kv=129, seed=6)
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, **kwargs)
    held = kwargs["score_mod"].__closure__[0].cell_contents  # alibi keeps slopes.reshape(-1)
    held.set_(torch.full_like(held, 0.5))
    torch.cuda.empty_cache()
    got, want = compare(q, k, v, formula(held.cpu()), attention=with_mods(kwargs))
    check(got, want, label="alibi over a new storage")


@pytest.mark.parametrize("kind", ["alibi", "document ids", "document ids, int64"])
def test_a_captured_graph_replays_the_current_values(records, kind):
    """A call captured after the shortcut kept its views (of the slopes, of int32 ids) or made its
    float32 copy of int64 ids (a copy the graph makes again at each replay): each replay reads the
    values the tensor holds at that replay, as the full path's capture would."""
    kwargs, captured, formula = case(kind, 129)
    q, k, v = (t.detach() for t in make_inputs(b=1, h=H, s_q=129, s_kv=129, seed=7))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            cudnn_flex.flex_attention(q, k, v, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cudnn_flex.flex_attention(q, k, v, **kwargs)
    cpu = lambda t: t.double().cpu()  # noqa: E731
    first = captured.clone()
    for values in (first.flip(-1) * 3 if captured.is_floating_point() else first.flip(-1), first):
        captured.copy_(values)
        graph.replay()
        torch.cuda.synchronize()
        want, _ = oracle.attention(cpu(q), cpu(k), cpu(v), formula(captured.cpu()))
        check({"out": cpu(out)}, {"out": want}, label=f"{kind} replay")
    assert records[0] == 1


@pytest.mark.parametrize("kind", ["bias table", "document ids", "document ids, int64"])
def test_a_buffer_swapped_by_load_state_dict_is_read(records, kind):
    """A module's captured buffer (a float table and int32 ids read in place, int64 ids copied
    each call), after the shortcut ran a few times, replaced by load_state_dict under torch's swap
    setting (torch.utils.swap_tensors, which refuses a tensor that a kept view holds): the next
    calls read the loaded values, out, lse and all three gradients."""
    kwargs, captured, formula = case(kind, 129)
    module = torch.nn.Module()
    module.register_buffer("captured", captured)
    q, k, v = make_inputs(b=2, h=H, s_q=129, s_kv=129, seed=8)
    for _ in range(3):
        cudnn_flex.flex_attention(q, k, v, **kwargs)
    loaded = captured.flip(-1) * 2 if captured.is_floating_point() else captured.flip(-1)
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.load_state_dict({"captured": loaded})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert torch.equal(captured, loaded)  # swapped in place of the object the mod holds
    got, want = compare(q, k, v, formula(loaded.cpu()), attention=with_mods(kwargs))
    assert records[0] == 1
    check(got, want, label=f"{kind} loaded")
