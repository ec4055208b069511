"""CPU tests of the benchmark package (benchmarks/): the case table and its inputs, the mods each
path writes, flops, ratios, figures, markdown, the JSON record and the plots.

The GPU measurements themselves run on the H100 only; here the package must import without a GPU,
every case must build at a tiny shape, cudnn-flex's and torch flex's mods must give the attention
the case names (checked against plain torch math written here), and made-up results must turn
into the tables, figures and plots that a real run would write.
"""

import math
import os
import sys
import warnings

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)   # the package lives at the repo root: python3 -m benchmarks

from benchmarks import cases, charts, cli, goals, paths, report, results, runner, timing  # noqa: E402
from benchmarks.cases import CASES, GRID_CASES, MASK_CASES, Shape  # noqa: E402
from benchmarks.results import Result, ResultSet  # noqa: E402

TINY = 64


def _results(ours_fe_ratio=1.01, speedup=2.5, causal_ratio=1.05):
    """A full synthetic grid at two shapes: frontend 1 ms fwd / 3 ms fwd+bwd everywhere."""
    rows = []
    for s in (4096, 8192):
        b = 16384 // s
        for case in GRID_CASES:
            for path in paths.paths_for(case):
                fwd, fb = 1.0 * s / 4096, 3.0 * s / 4096
                if path == "cudnn_flex":
                    fwd, fb = fwd * ours_fe_ratio, fb * ours_fe_ratio
                elif path == "torch_flex":
                    fwd, fb = fwd * ours_fe_ratio * speedup, fb * ours_fe_ratio * speedup
                elif path == "sdpa_cudnn" and case == "causal":
                    fwd, fb = fwd * ours_fe_ratio / causal_ratio, fb * ours_fe_ratio / causal_ratio
                rows.append(Result(case, path, b, 16, s, 128, fwd, fb, first_fwd_s=0.5, first_fwd_bwd_s=1.0))
    return ResultSet(rows)


def _mask_rows():
    """Made-up mask-case rows: measured, n/a, an error, and decode's forward-only row."""
    na = results.NA + paths.na_reason("window1k", "sdpa_cudnn")
    return [Result("window1k", "cudnn_flex", 1, 16, 8192, 128, 0.4, 1.2),
            Result("window1k", "frontend_native", 1, 16, 8192, 128, 0.38, 1.3),
            Result("window1k", "torch_flex", 1, 16, 8192, 128, 0.8, 2.4),
            Result("window1k", "sdpa_cudnn", 1, 16, 8192, 128, fwd_error=na, fwd_bwd_error=na),
            Result("gemma2", "frontend", 2, 16, 8192, 128, fwd_error="RuntimeError: no plan"),
            Result("decode", "cudnn_flex", 8, 32, 8192, 128, 0.05, h_kv=8, s_q=1,
                   fwd_bwd_error=runner.FORWARD_ONLY)]


# ---- results, order, arguments ------------------------------------------------------------------

def test_flops_and_tflops():
    fwd = results.attn_flops(2, 16, 4096, 4096, 128)
    assert fwd == 4 * 2 * 16 * 4096 * 4096 * 128
    assert results.attn_flops(2, 16, 4096, 4096, 128, backward=True) == pytest.approx(3.5 * fwd)
    assert results.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert results.tflops(1e12, None) is None
    r = Result("nomod", "sdpa_cudnn", 2, 16, 4096, 128, fwd_ms=0.5)
    assert r.tflops("fwd") == pytest.approx(fwd / 0.5e-3 / 1e12)
    assert r.tflops("fwd_bwd") is None
    decode = Result("decode", "cudnn_flex", 8, 32, 8192, 128, fwd_ms=1.0, s_q=1)
    assert decode.tflops("fwd") == pytest.approx(4 * 8 * 32 * 1 * 8192 * 128 / 1e-3 / 1e12)


def test_seqlens_and_shape_order():
    assert cases.parse_seqlen("4k") == 4096 and cases.parse_seqlen("512") == 512
    assert cases.seqlen_label(16384) == "16k" and cases.seqlen_label(100) == "100"
    order = runner.shape_order([1024, 4096, 8192, 16384], [64, 128])
    assert set(order[:2]) == {(4096, 128), (8192, 128)}       # the headline shapes first
    assert [d for _, d in order[:4]] == [128] * 4


def test_torch_flex_runs_after_every_other_path():
    assert runner.grid_passes(list(paths.PATHS)) == [
        [p for p in paths.PATHS if p != "torch_flex"], ["torch_flex"]]
    assert runner.grid_passes(["torch_flex"]) == [["torch_flex"]]
    assert runner.grid_passes(["cudnn_flex", "frontend"]) == [["cudnn_flex", "frontend"]]


def test_args():
    a = cli.parse_args(["--quick", "--cases", "softcap,alibi", "--out", "/tmp/x"])
    assert a.seqlen_list == [4096, 8192] and a.head_dim_list == [128]
    assert a.case_list == ["softcap", "alibi"] and a.out == "/tmp/x" and a.scale == 1
    assert set(a.path_list) == set(paths.PATHS)
    assert cli.parse_args([]).case_list == list(CASES)                  # every case by default
    assert cli.parse_args(["--cases", "masks,decode"]).case_list == list(MASK_CASES)
    assert cli.parse_args(["--tiny"]).scale == TINY
    with pytest.raises(SystemExit):
        cli.parse_args(["--cases", "nope"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--seqlens", "3000"])        # 16384 is not a multiple of 3000
    with pytest.raises(SystemExit):
        cli.parse_args(["--scale", "3"])             # divides no length


def test_work_list_runs_headline_shapes_then_mask_cases_then_the_rest():
    items = runner.work_list(cli.parse_args(["--tiny", "--seqlens", "1k,4k,8k"]))
    assert [sh.s * TINY for sh, _ in items[:2]] == [8192, 4096] and items[0][0].b == 2
    assert [names for _, names in items[2:-4]] == [[c] for c in MASK_CASES for _ in CASES[c].shapes]
    assert all(names == list(GRID_CASES) for _, names in items[:2] + items[-4:])   # 1k x 2 D, 4k/8k D=64
    decode = next(sh for sh, names in items if names == ["decode"])
    assert (decode.sq, decode.s, decode.h, decode.hkv) == (1, 8192 // TINY, 32, 8)   # one query stays one


def test_every_path_expresses_a_case_or_says_why():
    for case in CASES:
        for path in paths.PATHS:
            reason = paths.na_reason(case, path)
            assert reason is None or (isinstance(reason, str) and reason), (case, path)
        for path in ("cudnn_flex", "frontend", "torch_flex"):    # score_mod paths take every case
            assert path in paths.paths_for(case), (case, path)
    assert [c for c in CASES if "sdpa_flash" in paths.paths_for(c)] == ["nomod", "causal", "decode"]
    assert [c for c in CASES if "frontend_native" in paths.paths_for(c)] == ["causal", "window1k", "docs8x2k",
                                                                              "docsmix", "padded"]


class _StubGraph:
    """The two calls Ragged.place makes on a frontend graph."""

    def __init__(self):
        self.made = []

    def tensor_like(self, t):
        self.made.append(t)
        return ("graph tensor", len(self.made))


class _StubTensor:
    def __init__(self):
        self.dim = self.stride = self.offset = None

    def set_dim(self, d):
        self.dim = d
        return self

    def set_stride(self, s):
        self.stride = s
        return self

    def set_ragged_offset(self, o):
        self.offset = o
        return self


def test_native_packed_documents_use_cudnns_ragged_layout():
    """frontend_native's packed documents: [n, H, longest, D] located by cu_seqlens times each
    buffer's token stride, one offsets tensor per stride."""
    from benchmarks.paths.frontend import Ragged
    ragged = Ragged.of([3, 5, 2], "cpu")
    assert ragged.cu.tolist() == [0, 3, 8, 10] and ragged.seq_len.view(-1).tolist() == [3, 5, 2]
    g, pack = _StubGraph(), {}
    bhsd = torch.empty(1, 4, 10, 8)                      # token stride 8
    bshd = torch.empty(1, 10, 4, 8).transpose(1, 2)      # token stride 32
    a = ragged.place(g, _StubTensor(), bhsd, pack)
    b = ragged.place(g, _StubTensor(), bhsd, pack)
    c = ragged.place(g, _StubTensor(), bshd, pack)
    assert a.dim == [3, 4, 5, 8] and a.stride == [5 * 8, 80, 8, 1]
    assert c.dim == [3, 4, 5, 8] and c.stride == [5 * 32, 8, 32, 1]
    assert a.offset == b.offset != c.offset and len(g.made) == 2
    assert [v.view(-1).tolist() for _, v in pack.values()] == [[0, 24, 64, 80], [0, 96, 256, 320]]


# ---- figures, markdown, JSON, plots -------------------------------------------------------------

def test_ratios_and_figures_met():
    rs = _results()
    assert rs.ratio(("softcap", "cudnn_flex"), ("softcap", "frontend"), 4096, 128, "fwd") == pytest.approx(1.01)
    assert rs.ratio(("softcap", "torch_flex"), ("softcap", "cudnn_flex"), 8192, 128, "fwd_bwd") == pytest.approx(2.5)
    assert rs.ratio(("softcap", "cudnn_flex"), ("softcap", "frontend"), 1024, 128, "fwd") is None
    host = {"cudnn_flex": {"fwd": 10.0, "fwd_bwd": 30.0}, "frontend": {"fwd": 60.0, "fwd_bwd": 150.0},
            "sdpa_cudnn": {"fwd": 9.0, "fwd_bwd": 28.0}}
    for r in _mask_rows():     # mask cases at other shapes change no figure
        rs.add(r)
    figures = goals.all_figures(rs, host)
    assert len(figures) == len(GRID_CASES) + len(goals.GOAL_SPEEDUP_VS_TORCH_FLEX) + 3
    assert all(f.met for f in figures), [f.line() for f in figures if not f.met]


def test_figures_missed_say_by_how_much():
    rs = _results(ours_fe_ratio=1.10, speedup=1.2, causal_ratio=1.2)
    host = {"cudnn_flex": {"fwd": 20.0}, "frontend": {"fwd": 50.0}}
    figures = {f.name: f for f in goals.all_figures(rs, host)}
    fe = figures["ours/frontend GPU time, softcap"]
    assert fe.met is False and "7.0% over the goal" in fe.text
    sp = figures["fwd+bwd speedup over compiled torch flex, softcap"]
    assert sp.met is False and "short of 2.0x by 40%" in sp.text
    assert figures["fwd+bwd speedup over compiled torch flex, alibi"].met is False
    assert figures["causal by score_mod (ours) / native causal (SDPA cuDNN)"].met is False
    h = figures["host time per cached forward call"]
    assert h.met is False and "5.0 us over" in h.text
    assert "MISSED" in h.line()


def test_figures_not_measured():
    figures = goals.all_figures(ResultSet(), {})
    assert all(f.met is None for f in figures)
    assert all("not measured" in f.line() for f in figures)


def test_markdown_and_summary():
    rs = _results()
    rs.add(Result("softcap", "frontend", 1, 16, 16384, 128, fwd_error="RuntimeError: cuDNN said | no"))
    rs.add(Result("alibi", "torch_flex", 1, 16, 16384, 128,
                  fwd_error=results.SKIPPED, fwd_bwd_error=results.SKIPPED))
    for r in _mask_rows():
        rs.add(r)
    host = {"cudnn_flex": {"fwd": 10.0, "fwd_bwd": 30.0}, "frontend": {"error": "boom"}}
    cold = {"new score_mod structure": {"fwd_s": 1.2, "bwd_s": 1.5, "builds": 2},
            "new process, empty plan store": {"fwd_s": 0.5, "bwd_s": 0.9, "plan_loads": 0, "plan_stores": 2},
            "new process, warm plan store": {"fwd_s": 0.03, "bwd_s": 0.04, "plan_loads": 2, "plan_stores": 0,
                                             "same_bits": False}}
    meta = {"device": "H100", "versions": "v", "command": "python3 -m benchmarks", "wall_s": 300.0,
            "budget_s": 420.0, "skipped": 2}
    figures = goals.all_figures(rs, host)
    md = report.markdown(rs, meta, host, cold, figures, ["benchmarks.png"])
    assert "| S | D | B | case | path |" in md and "## Figures (issue 5)" in md
    assert "- device: H100" in md and "`python3 -m benchmarks`" in md
    assert "![benchmarks](benchmarks.png)" in md
    assert "1.01x" in md                                     # ours / frontend
    assert "error: RuntimeError: cuDNN said / no" in md      # a '|' must not break the table
    assert "| skipped |" in md and "## Errors" in md
    assert "forward graph 1.200 s, backward graph 1.500 s" in md
    assert "new process, empty plan store: forward graph 0.500 s, backward graph 0.900 s (first call, " \
           "synchronized; plans loaded 0, stored 2)" in md
    assert "warm plan store: forward graph 0.030 s, backward graph 0.040 s (first call, synchronized; plans " \
           "loaded 2, stored 0; NOT the result of the process that built them)" in md
    assert report.first_call_totals(rs)["torch_flex"] == pytest.approx(2 * 6 * 1.5)
    assert "torch_flex 18.0" in md
    table = report.gpu_table(rs)
    assert all(line in md for line in table)
    assert len({line.count("|") for line in table}) == 1     # every row has the header's columns
    assert not any("window1k" in line for line in table)     # mask cases have their own table
    masks = report.mask_table(rs)
    assert all(line in md for line in masks) and len({line.count("|") for line in masks}) == 1
    assert "| window1k | B=1 H=16 S=8k D=128 | torch_flex | 0.800 | 2.00x | 2.400 | 2.00x |" in md
    assert "| window1k | B=1 H=16 S=8k D=128 | sdpa_cudnn | n/a | – | n/a |" in md
    assert "| decode | B=8 H=32/8 Sq=1 Skv=8k D=128 | cudnn_flex | 0.050 | 1.00x | n/a |" in md
    assert "## Not expressible (n/a)" in md and "- window1k / sdpa_cudnn: SDPA has no score_mod" in md
    assert "- decode / fwd+bwd on every path: forward only" in md
    assert "- gemma2 / frontend / B=2 H=16 S=8k D=128 / fwd: RuntimeError: no plan" in md
    text = report.summary(rs, host, figures)
    assert text.splitlines()[0].startswith("== summary")
    assert "softcap" in text and "host us/call fwd" in text
    assert "window1k" in text and "frontend_native 1.08x" in text and "torch_flex 2.00x" in text
    assert "sdpa_cudnn" not in text.split("== mask cases")[1].split("\n")[1]   # n/a paths left out


def test_measure_after_the_budget_is_skipped_without_touching_the_gpu():
    args = cli.parse_args(["--quick"])
    r = runner.measure("softcap", "torch_flex", {"shape": Shape(2, 16, 8192, 128)}, args,
                       deadline=runner.time.perf_counter() - 1.0)
    assert r.fwd_error == r.fwd_bwd_error == results.SKIPPED and r.ms("fwd") is None
    r = runner.measure("decode", "sdpa_flash", {"shape": Shape(8, 32, 8192, 128, h_kv=8, s_q=1)}, args,
                       deadline=runner.time.perf_counter() - 1.0)
    assert r.fwd_error == results.SKIPPED and r.status("fwd_bwd") == "n/a" and (r.s_q, r.h_kv) == (1, 8)


def test_json_is_the_record_and_the_report_is_made_again_from_it(tmp_path):
    rs = _results()
    for r in _mask_rows():
        rs.add(r)
    meta = {"device": "H100", "versions": "v", "command": "c"}
    path = str(tmp_path / "benchmarks.json")
    results.save_json(path, rs, meta, {"cudnn_flex": {"fwd": 10.0}}, {})
    back, meta_back, host, cold = results.load_json(path)
    assert back.rows == rs.rows and meta_back == meta and host == {"cudnn_flex": {"fwd": 10.0}}
    assert cli.main(["--from-json", path, "--no-matplotlib"]) == 0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| window1k |" in md and "skipped the plot (--no-matplotlib)" in md


def test_write_outputs_without_matplotlib_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    md_path, figures, note = cli.write_outputs(str(tmp_path), _results(), {"command": "c"}, {}, {})
    assert note.startswith("skipped the plot: matplotlib is not installed (pip install -r benchmarks/requirements.txt")
    assert f"--from-json {tmp_path / 'benchmarks.json'}" in note and "\n" not in note
    assert os.path.exists(md_path) and (tmp_path / "benchmarks.json").exists()
    assert not list(tmp_path.glob("*.png"))
    assert f"(no plot: {note})" in open(md_path).read()


def test_charts_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    rs = _results()
    for r in _mask_rows():
        rs.add(r)
    md_path, _, note = cli.write_outputs(str(tmp_path), rs, {"command": "c"}, {}, {})
    assert note == "matplotlib: benchmarks.png, benchmarks_masks.png"
    for name in (charts.GRID_PNG, charts.MASKS_PNG):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
        assert f"![benchmarks]({name})" in open(md_path).read()


# ---- every case, tiny, on the CPU ---------------------------------------------------------------

def _tiny_shapes(case):
    """The case's shapes scaled down by TINY; the grid cases at one small grid shape."""
    if CASES[case].grid:
        return [Shape(2, 4, 128, 32)]
    return [shape.scaled(TINY) for shape in CASES[case].shapes]


def _inputs(case, shape):
    return cases.make_inputs(shape, [case], device="cpu", dtype=torch.float32, scale=TINY)


def _doc_lengths(ids):
    return torch.unique_consecutive(ids, return_counts=True)[1].tolist()


def test_every_case_builds_its_inputs_at_a_tiny_shape():
    for case in CASES:
        for shape in _tiny_shapes(case):
            x = _inputs(case, shape)
            assert x["q"].shape == (shape.b, shape.h, shape.sq, shape.d), case
            assert x["k"].shape == x["v"].shape == (shape.b, shape.hkv, shape.s, shape.d), case
            assert x["do"].shape == x["q"].shape and x["q"].requires_grad
            again = _inputs(case, shape)                            # seeded: the same every pass
            assert torch.equal(again["q"], x["q"]) and torch.equal(again["v"], x["v"])
    s = 16384 // TINY
    assert _doc_lengths(_inputs("docs8x2k", Shape(1, 16, s, 128))["doc_ids"]) == [s // 8] * 8
    mix = _doc_lengths(_inputs("docsmix", Shape(1, 16, s, 128))["doc_ids"])
    assert sum(mix) == s and len(set(mix)) > 3 and all(300 // TINY <= n <= 4000 // TINY for n in mix[:-1])
    full = cases.doc_mix_lengths(16384, 300, 4000)
    assert sum(full) == 16384 and all(300 <= n <= 4000 for n in full[:-1])
    lengths = _inputs("padded", Shape(8, 16, 64, 128))["lengths"]
    assert lengths[0] == 64 and ((lengths >= 8) & (lengths <= 64)).all() and len(set(lengths.tolist())) > 2


def _expected(case, x):
    """Plain torch attention of the case, in float64, with the mask and mod written out here."""
    shape = x["shape"]
    q, k, v = (x[n].detach().double() for n in ("q", "k", "v"))
    k, v = (t.repeat_interleave(shape.h // shape.hkv, dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(shape.d)
    b, h, qi, kv = (torch.arange(n).view([-1 if i == j else 1 for j in range(4)]) for i, n in enumerate(s.shape))
    slopes = 2.0 ** (-8.0 * (h + 1) / shape.h)
    keep = torch.ones(s.shape, dtype=torch.bool)
    if case == "causal":
        keep = qi >= kv
    elif case == "softcap":
        s = 30.0 * torch.tanh(s / 30.0)
    elif case == "alibi":
        s = s + slopes * (kv - qi)
    elif case == "relbias":
        s = s + (qi - kv) * 0.01
    elif case == "docmask":
        doc = torch.arange(shape.s) * 4 // shape.s
        keep = doc[qi] == doc[kv]
    elif case == "window1k":
        keep = (qi - kv >= 0) & (qi - kv < 1024 // TINY)
    elif case in ("docs8x2k", "docsmix"):
        doc = torch.repeat_interleave(torch.arange(len(x["doc_lengths"])), torch.tensor(x["doc_lengths"]))
        keep = doc[qi] == doc[kv]
    elif case == "decode_softcap":
        s = 50.0 * torch.tanh(s / 50.0)
    elif case == "gemma2":
        s = 50.0 * torch.tanh(s / 50.0)
        keep = (qi - kv >= 0) & (qi - kv < 4096 // TINY)
    elif case == "padded":
        n = x["lengths"].view(-1, 1, 1, 1)
        keep = (qi < n) & (kv < n)
    elif case == "decode_alibi":
        s = s + slopes * (kv - (shape.s - 1))     # the one query sits at the cache's last position
    s = torch.where(keep, s, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)   # a fully masked row (padding) attends nothing
    return p @ v


@pytest.mark.parametrize("case", list(CASES))
def test_cudnn_flex_mods_match_plain_torch_on_the_cpu_reference(case):
    """cudnn-flex's mods, as the benchmark passes them, run on the reference path (CPU tensors)
    and give the attention the case names."""
    pytest.importorskip("cudnn_flex")
    from benchmarks.paths import ours
    for shape in _tiny_shapes(case):
        x = _inputs(case, shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = ours.runner(case, x)(x["q"], x["k"], x["v"])
        torch.testing.assert_close(got.double(), _expected(case, x), atol=1e-4, rtol=1e-4, msg=case)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_flex_mods_match_plain_torch_on_the_cpu(case):
    """The torch flex path's score_mod and BlockMask (eager flex_attention on the CPU) give the
    same attention, so the benchmark compares like with like."""
    from torch.nn.attention.flex_attention import flex_attention
    from benchmarks.paths import torch_flex
    for shape in _tiny_shapes(case):
        x = _inputs(case, shape)
        score_mod, block_mask = torch_flex.mods(case, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q, k, v = (x[n].detach() for n in ("q", "k", "v"))     # no flex backward on the CPU
            got = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=shape.hkv != shape.h)
        torch.testing.assert_close(got.double(), _expected(case, x), atol=1e-4, rtol=1e-4, msg=case)


def test_host_time_figure_names_the_worst_kind_against_sdpa():
    host = {"sdpa_cudnn": {"fwd": 20.0, "fwd_bwd": 100.0},
            "cudnn_flex no mod": {"fwd": 22.0, "fwd_bwd": 110.0},
            "cudnn_flex torch-style softcap": {"fwd": 30.0, "fwd_bwd": 120.0},
            "cudnn_flex varlen causal": {"error": "boom"},
            "frontend": {"fwd": 90.0, "fwd_bwd": 400.0}}       # not a kind of this library: not counted
    (figure,) = goals.figure_host_vs_sdpa(host)
    assert figure.met is False
    assert "worst 1.50 (cudnn_flex torch-style softcap, fwd)" in figure.text
    assert "over: cudnn_flex torch-style softcap fwd 1.50" in figure.text
    host["cudnn_flex torch-style softcap"] = {"fwd": 25.0, "fwd_bwd": 120.0}
    assert goals.figure_host_vs_sdpa(host)[0].met is True
    assert goals.figure_host_vs_sdpa({})[0].met is None
    # A row timed alternating with SDPA gives its own ratio, whatever SDPA's row of the run says.
    host["cudnn_flex no mod"] = {"fwd": 22.0, "fwd_bwd": 110.0, "vs_sdpa": {"fwd": 1.4, "fwd_bwd": 1.05}}
    (figure,) = goals.figure_host_vs_sdpa(host)
    assert figure.met is False and "worst 1.40 (cudnn_flex no mod, fwd)" in figure.text
    table = "\n".join(report.host_table(host))
    assert "| cudnn_flex no mod | 22.0 | 110.0 | 1.40x | 1.05x |" in table
    assert "| sdpa_cudnn | 20.0 | 100.0 | – | – |" in table


def test_paired_host_time_takes_each_ratio_within_its_round(monkeypatch):
    """timing.host_us_paired on a fake clock: the host slows down round after round (both loops
    of a round alike), which moves the us but not the ratio; the order of the two loops swaps
    every round, so neither always runs on the warmer host."""
    now, last, synced = [0.0], [None], []

    def loop_of(name, us):
        def call():
            last[0] = name
            rounds = max(len(synced) - 1, 0) // 2  # a sync after the warm-up, then after each loop
            now[0] += us * (1 + 0.5 * rounds) * 1e-6
        return call

    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: synced.append(last[0]))
    mine, theirs, ratio = timing.host_us_paired(loop_of("fn", 30.0), loop_of("anchor", 20.0), calls=4, rounds=5,
                                                warmup=1)
    assert ratio == pytest.approx(1.5)
    assert mine == pytest.approx(30.0 * 2) and theirs == pytest.approx(20.0 * 2)  # the third round's host
    assert synced[1:7] == ["fn", "anchor", "anchor", "fn", "fn", "anchor"]


def test_every_kind_of_call_the_host_table_times_runs():
    pytest.importorskip("cudnn_flex")
    inputs = cases.make_inputs(runner.HOST_SHAPE, device="cpu", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (run, own) in runner._host_kinds(inputs).items():
            q, k, v = own["q"], own["k"], own["v"]
            out = run(q, k, v)
            assert out.shape == q.shape and torch.isfinite(out).all(), name
            dq, = torch.autograd.grad(out, (q,), own["do"])  # what the timed forward+backward asks
            assert dq.shape == q.shape, name
            if "varlen" in name:  # packed once, outside the timed call: dense [total, H, D] leaves
                assert q.dim() == 3 and q.is_contiguous() and q.is_leaf and q.requires_grad
                torch.testing.assert_close(q, inputs["q"].squeeze(0).transpose(0, 1))
