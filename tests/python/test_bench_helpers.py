"""CPU tests of benchmarks/bench.py's plain helpers: flops, ratios, figures, markdown, PNG writer.

The GPU measurements themselves run on the H100 only; here the module must import without a GPU
and turn made-up results into the tables, figures and plot that a real run would write.
"""

import importlib.util
import os
import struct
import sys
import warnings
import zlib

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(_ROOT, "benchmarks", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module   # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _results(ours_fe_ratio=1.01, speedup=2.5, causal_ratio=1.05):
    """A full synthetic grid at two shapes: frontend 1 ms fwd / 3 ms fwd+bwd everywhere."""
    rows = []
    for s in (4096, 8192):
        b = 16384 // s
        for case in bench.CASES:
            for path in bench.CASE_PATHS[case]:
                fwd, fb = 1.0 * s / 4096, 3.0 * s / 4096
                if path == "cudnn_flex":
                    fwd, fb = fwd * ours_fe_ratio, fb * ours_fe_ratio
                elif path == "torch_flex":
                    fwd, fb = fwd * ours_fe_ratio * speedup, fb * ours_fe_ratio * speedup
                elif path == "sdpa_cudnn" and case == "causal":
                    fwd, fb = fwd * ours_fe_ratio / causal_ratio, fb * ours_fe_ratio / causal_ratio
                rows.append(bench.Result(case, path, b, 16, s, 128, fwd, fb, first_fwd_s=0.5, first_fwd_bwd_s=1.0))
    return bench.ResultSet(rows)


def test_flops_and_tflops():
    fwd = bench.attn_flops(2, 16, 4096, 4096, 128)
    assert fwd == 4 * 2 * 16 * 4096 * 4096 * 128
    assert bench.attn_flops(2, 16, 4096, 4096, 128, backward=True) == pytest.approx(3.5 * fwd)
    assert bench.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert bench.tflops(1e12, None) is None
    r = bench.Result("nomod", "sdpa_cudnn", 2, 16, 4096, 128, fwd_ms=0.5)
    assert r.tflops("fwd") == pytest.approx(fwd / 0.5e-3 / 1e12)
    assert r.tflops("fwd_bwd") is None


def test_seqlens_and_shape_order():
    assert bench.parse_seqlen("4k") == 4096 and bench.parse_seqlen("512") == 512
    assert bench.seqlen_label(16384) == "16k" and bench.seqlen_label(100) == "100"
    order = bench.shape_order([1024, 4096, 8192, 16384], [64, 128])
    assert set(order[:2]) == {(4096, 128), (8192, 128)}       # the headline shapes first
    assert [d for _, d in order[:4]] == [128] * 4


def test_torch_flex_runs_after_every_other_path():
    assert bench.grid_passes(list(bench.PATHS)) == [
        [p for p in bench.PATHS if p != "torch_flex"], ["torch_flex"]]
    assert bench.grid_passes(["torch_flex"]) == [["torch_flex"]]
    assert bench.grid_passes(["cudnn_flex", "frontend"]) == [["cudnn_flex", "frontend"]]


def test_args():
    a = bench.parse_args(["--quick", "--cases", "softcap,alibi", "--out", "/tmp/x"])
    assert a.seqlen_list == [4096, 8192] and a.head_dim_list == [128]
    assert a.case_list == ["softcap", "alibi"] and a.out == "/tmp/x"
    assert set(a.path_list) == set(bench.PATHS)
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--seqlens", "3000"])        # 16384 is not a multiple of 3000


def test_ratios_and_figures_met():
    rs = _results()
    assert rs.ratio(("softcap", "cudnn_flex"), ("softcap", "frontend"), 4096, 128, "fwd") == pytest.approx(1.01)
    assert rs.ratio(("softcap", "torch_flex"), ("softcap", "cudnn_flex"), 8192, 128, "fwd_bwd") == pytest.approx(2.5)
    assert rs.ratio(("softcap", "cudnn_flex"), ("softcap", "frontend"), 1024, 128, "fwd") is None
    host = {"cudnn_flex": {"fwd": 10.0, "fwd_bwd": 30.0}, "frontend": {"fwd": 60.0, "fwd_bwd": 150.0}}
    figures = bench.all_figures(rs, host)
    assert len(figures) == len(bench.CASES) + len(bench.GOAL_SPEEDUP_VS_TORCH_FLEX) + 2
    assert all(f.met for f in figures), [f.line() for f in figures if not f.met]


def test_figures_missed_say_by_how_much():
    rs = _results(ours_fe_ratio=1.10, speedup=1.2, causal_ratio=1.2)
    host = {"cudnn_flex": {"fwd": 20.0}, "frontend": {"fwd": 50.0}}
    figures = {f.name: f for f in bench.all_figures(rs, host)}
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
    figures = bench.all_figures(bench.ResultSet(), {})
    assert all(f.met is None for f in figures)
    assert all("not measured" in f.line() for f in figures)


def test_markdown_and_summary():
    rs = _results()
    rs.add(bench.Result("softcap", "frontend", 1, 16, 16384, 128, fwd_error="RuntimeError: cuDNN said | no"))
    rs.add(bench.Result("alibi", "torch_flex", 1, 16, 16384, 128,
                        fwd_error="skipped: time budget", fwd_bwd_error="skipped: time budget"))
    host = {"cudnn_flex": {"fwd": 10.0, "fwd_bwd": 30.0}, "frontend": {"error": "boom"}}
    cold = {"new score_mod structure": {"fwd_s": 1.2, "bwd_s": 1.5, "builds": 2}}
    meta = {"device": "H100", "versions": "v", "command": "python3 benchmarks/bench.py", "wall_s": 300.0,
            "budget_s": 420.0, "skipped": 2}
    figures = bench.all_figures(rs, host)
    md = bench.markdown(rs, meta, host, cold, figures, "benchmarks.png")
    assert "| S | D | B | case | path |" in md and "## Figures (issue 5)" in md
    assert "- device: H100" in md and "`python3 benchmarks/bench.py`" in md
    assert "1.01x" in md                                     # ours / frontend
    assert "error: RuntimeError: cuDNN said / no" in md      # a '|' must not break the table
    assert "| skipped |" in md and "## Errors" in md
    assert "forward graph 1.200 s, backward graph 1.500 s" in md
    assert bench.first_call_totals(rs)["torch_flex"] == pytest.approx(2 * 6 * 1.5)
    assert "torch_flex 18.0" in md
    table = bench.gpu_table(rs)
    assert all(line in md for line in table)
    assert len({line.count("|") for line in table}) == 1     # every row has the header's columns
    text = bench.summary(rs, host, figures)
    assert text.splitlines()[0].startswith("== summary")
    assert "softcap" in text and "host us/call fwd" in text


def _read_png(path):
    np = pytest.importorskip("numpy")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * (3 * w + 1):(y + 1) * (3 * w + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return np.frombuffer(b"".join(r[1:] for r in rows), np.uint8).reshape(h, w, 3), depth, color


def test_png_writer_round_trip(tmp_path):
    np = pytest.importorskip("numpy")
    img = np.zeros((7, 5, 3), np.uint8)
    img[2, 3] = (10, 20, 30)
    path = tmp_path / "x.png"
    bench.write_png(str(path), img)
    back, depth, color = _read_png(str(path))
    assert depth == 8 and color == 2
    assert np.array_equal(back, img)


def test_bar_chart_draws_bars_in_path_colors():
    np = pytest.importorskip("numpy")
    img = bench.bar_chart([(["a", "b"], [[100.0, 50.0], [None, 200.0]])], ["cudnn_flex", "torch_flex"],
                          width=200, panel_height=100)
    assert img.shape == (124, 200, 3) and img.dtype == np.uint8
    for key in ("cudnn_flex", "torch_flex"):
        assert (img == np.array(bench.PALETTE[key], np.uint8)).all(axis=2).sum() > 20


def test_measure_after_the_budget_is_skipped_without_touching_the_gpu():
    args = bench.parse_args(["--quick"])
    inputs = {"b": 2, "h": 16, "s": 8192, "d": 128}
    r = bench.measure("softcap", "torch_flex", inputs, args, deadline=bench.time.perf_counter() - 1.0)
    assert r.fwd_error == r.fwd_bwd_error == "skipped: time budget" and r.ms("fwd") is None


def test_write_outputs_without_matplotlib(tmp_path):
    rs = _results()
    meta = {"device": "H100", "versions": "v", "command": "c"}
    md_path, figures = bench.write_outputs(str(tmp_path), rs, meta, {}, {}, use_matplotlib=False)
    assert os.path.exists(md_path)
    img, _, _ = _read_png(str(tmp_path / "benchmarks.png"))
    assert img.shape[1] == 960
    assert meta["plot"].startswith("numpy fallback") and "S=8k D=128" in meta["plot"]
    assert (tmp_path / "benchmarks.json").exists()


def test_torch_style_mods_match_the_library_mods_on_cpu():
    """The same six cases written for cudnn-flex (reference path) and for torch flex_attention
    give the same attention, so the benchmark compares like with like."""
    cudnn_flex = pytest.importorskip("cudnn_flex")
    from torch.nn.attention.flex_attention import flex_attention
    b, h, s, d = 2, 4, 128, 32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=gen) for _ in range(3))
    doc = (torch.arange(s) * bench.DOCS_PER_SEQ // s).float().expand(b, s).contiguous()
    inputs = {"b": b, "s": s, "q": q, "slopes": cudnn_flex.mods.alibi_slopes(h), "doc": doc,
              "doc_q": doc.view(b, 1, s, 1), "doc_kv": doc.view(b, 1, 1, s)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in bench.CASES:
            mod, bprop, tensors = bench.ours_mod(case, inputs)
            ours = cudnn_flex.flex_attention(q, k, v, mod, bprop, score_mod_tensors=tensors)
            score_mod, block_mask = bench.torch_flex_mod(case, inputs)
            theirs = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=case)
