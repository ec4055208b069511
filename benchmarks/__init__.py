"""cudnn-flex against what a user would pick instead, in one run, on the same inputs (issue 5 and
the masks issue). Run from the repo root on the GPU machine (extension built in place):

  PYTHONPATH=$PWD/python python3 -m benchmarks --out $OUT      (--help for the flags)

One job per module:
  cases.py        the case table (name -> shapes, mask/mod description) and the input makers
  paths/          how each framework runs a case: ours.py (cudnn_flex), sdpa.py (torch SDPA),
                  torch_flex.py (compiled flex_attention + BlockMasks), frontend.py (cuDNN
                  frontend Python graphs, score_mod and native masks); n/a reasons per case
  timing.py       CUDA-event medians, first (cold) calls, host time per cached call
  runner.py       the order of the run, one Result per (case, path, shape), host and cold builds
  results.py      Result / ResultSet, flops, the JSON record
  goals.py        issue 5's goals and the "figures reached" lines
  report.py       markdown tables and the printed summary
  charts.py       plots (matplotlib only; skipped with one line when it is not installed)
  environment.py  device, versions, command
  cli.py          flags and main; __main__.py runs it

Everything but runner.py, timing.py and the paths' runners is plain Python, tested on the CPU by
tests/python/test_bench_helpers.py; cudnn_flex, cudnn and torch's flex_attention are imported
when a path is built. matplotlib is in benchmarks/requirements.txt, not the library's.
"""
