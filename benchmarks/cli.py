"""The command line: python3 -m benchmarks [flags] (from the repo root, extension built in place).

  PYTHONPATH=$PWD/python python3 -m benchmarks --out $OUT

Writes <out>/benchmarks.json (the record), <out>/benchmarks.md and, with matplotlib,
<out>/benchmarks.png (grid) and <out>/benchmarks_masks.png (mask cases); prints a short summary
last. --from-json FILE makes the markdown and plots again from a saved record, without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .cases import CASE_GROUPS, CASE_NAMES, CASES, parse_seqlen
from .charts import write_charts
from .goals import all_figures
from .paths import PATHS
from .report import markdown, summary
from .results import load_json, save_json

TINY_SCALE = 64   # --tiny: 16k -> 256, windows 1024 -> 16; every case keeps its structure


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks",
        description="cudnn-flex vs torch SDPA, compiled torch flex_attention and the cuDNN frontend "
                    "Python graph path, on the same inputs; writes benchmarks.json/.md/.png.")
    ap.add_argument("--out", default=None,
                    help="output folder (default: $OUT if set, else benchmarks/out; with --from-json, "
                         "the record's folder)")
    ap.add_argument("--quick", action="store_true", help="only S in {4k, 8k}, D=128 (grid cases)")
    ap.add_argument("--cases", default=",".join(CASE_NAMES),
                    help=f"comma list of {', '.join(CASE_NAMES)}, or the groups {', '.join(CASE_GROUPS)}")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {', '.join(PATHS)}")
    ap.add_argument("--seqlens", default="1k,2k,4k,8k,16k", help="grid cases: comma list, e.g. 4k,8k")
    ap.add_argument("--head-dims", default="128,64", help="grid cases: comma list of head dims")
    ap.add_argument("--tokens", type=int, default=16384, help="grid cases: B*S, fixed (default 16384)")
    ap.add_argument("--heads", type=int, default=16, help="grid cases: heads")
    ap.add_argument("--scale", type=int, default=1,
                    help="divide every sequence length, window and document length by this (smoke runs)")
    ap.add_argument("--tiny", action="store_true", help=f"--scale {TINY_SCALE}")
    ap.add_argument("--iters", type=int, default=10, help="timed calls per measurement (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after the first one")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no new GPU-time measurement after this many seconds of the run "
                         "(the rest is marked skipped); 0 = no limit")
    ap.add_argument("--host-calls", type=int, default=300, help="calls per host-time repeat")
    ap.add_argument("--no-host", action="store_true", help="skip the host-time measurement")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-build measurement")
    ap.add_argument("--flex-compile", choices=("static", "auto"), default="static",
                    help="torch.compile(flex_attention, dynamic=False) compiles per mod and shape, "
                         "each shape's best kernels (default); 'auto' is torch's automatic dynamic "
                         "shapes: fewer compiles, but shapes after the first get dynamic kernels")
    ap.add_argument("--no-matplotlib", action="store_true", help="write no plot (JSON and markdown only)")
    ap.add_argument("--from-json", metavar="FILE",
                    help="no measurement: write the markdown and plots of a saved benchmarks.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.seqlens, args.head_dims = "4k,8k", "128"
    if args.tiny:
        args.scale = TINY_SCALE
    args.case_list = _checked_list(ap, args.cases, CASE_NAMES, "--cases", CASE_GROUPS)
    args.path_list = _checked_list(ap, args.paths, PATHS, "--paths")
    args.seqlen_list = [parse_seqlen(x) for x in args.seqlens.split(",") if x.strip()]
    args.head_dim_list = [int(x) for x in args.head_dims.split(",") if x.strip()]
    for s in args.seqlen_list:
        if args.tokens % s:
            ap.error(f"--tokens {args.tokens} is not a multiple of S={s}")
    if args.scale < 1:
        ap.error("--scale must be >= 1")
    lengths = args.seqlen_list + [sh.s for c in args.case_list for sh in CASES[c].shapes]
    if any(s % args.scale for s in lengths):
        ap.error(f"--scale {args.scale} does not divide every sequence length ({sorted(set(lengths))})")
    if args.out is None:
        args.out = (os.path.dirname(os.path.abspath(args.from_json)) if args.from_json
                    else os.environ.get("OUT") or os.path.join("benchmarks", "out"))
    return args


def _checked_list(ap, text: str, allowed: tuple, flag: str, groups=None) -> list:
    items = []
    for x in (x.strip() for x in text.split(",") if x.strip()):
        items += list((groups or {}).get(x, (x,)))
    bad = [x for x in items if x not in allowed]
    if bad:
        ap.error(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    return list(dict.fromkeys(items))   # a case named twice (directly and by group) runs once


def write_outputs(out_dir: str, rs, meta: dict, host: dict, cold: dict, plot: bool = True,
                  save: bool = True) -> tuple:
    """benchmarks.json first (the record: nothing after it can lose the run), then the plots and
    benchmarks.md; returns (md path, figures, the plot's one-line note)."""
    os.makedirs(out_dir, exist_ok=True)
    figures = all_figures(rs, host)
    if save:
        save_json(os.path.join(out_dir, "benchmarks.json"), rs, meta, host, cold, figures)
    plots, note = [], "skipped the plot (--no-matplotlib)"
    if plot:
        try:
            plots, note = write_charts(rs, out_dir)
        except Exception as e:  # noqa: BLE001  (a plot failure must not lose the tables)
            note = f"plot failed: {type(e).__name__}: {e}"
    md_path = os.path.join(out_dir, "benchmarks.md")
    with open(md_path, "w") as f:
        f.write(markdown(rs, {**meta, "plot": note}, host, cold, figures, plots))
        f.write(f"\nPlot: {note}\n")
    return md_path, figures, note


def _from_json(args) -> int:
    rs, meta, host, cold = load_json(args.from_json)
    md_path, figures, note = write_outputs(args.out, rs, meta, host, cold, plot=not args.no_matplotlib,
                                           save=False)
    print(f"wrote {md_path}; {note}")
    print("\n" + summary(rs, host, figures))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.from_json:
        return _from_json(args)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s if args.budget_s > 0 else 0.0
    import torch
    if not torch.cuda.is_available():
        print("python3 -m benchmarks needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from . import fresh_process, runner
    from .environment import environment
    from .paths import frontend
    torch.manual_seed(0)
    meta = environment(args, argv)
    print(meta["device"], "|", meta["versions"], flush=True)
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    runner.warm_up(args, log)
    cold = {}
    if not args.no_cold and "cudnn_flex" in args.path_list:
        cold = runner.guarded(runner.measure_cold, "cold build", args, log)
        cold.update(runner.guarded(fresh_process.measure, "new-process start", args, log))
    host = {} if args.no_host else runner.guarded(runner.measure_host, "host time", args, log)
    rs = runner.run_grid(args, deadline, log)

    meta["wall_s"] = time.perf_counter() - t_start
    meta["budget_s"] = args.budget_s
    meta["skipped"] = sum(1 for r in rs.rows for m in ("fwd", "fwd_bwd") if r.status(m) == "skipped")
    try:
        import cudnn_flex
        meta["cudnn_flex_cache"] = str(cudnn_flex.cache_stats())
    except Exception:  # noqa: BLE001
        pass
    if frontend.plans():
        meta["frontend_plans"] = frontend.plans()
    md_path, figures, note = write_outputs(args.out, rs, meta, host, cold, plot=not args.no_matplotlib)
    print(f"\nwrote {md_path} and benchmarks.json; {note}", flush=True)
    print("\n" + summary(rs, host, figures), flush=True)
    return 0
