#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests, report. Expects the cp312 cuDNN frontend wheel in
# .whl/ (carried; see README "Developing"). Prints a short summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# The benchmark's own requirements (matplotlib, for its plots; not the library's), from wheels carried
# in .whl/bench/ (README "Developing"): this machine has no network. Without them
# `python3 -m benchmarks` still writes its JSON and markdown and says it skipped the plot.
if ls .whl/bench/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --find-links .whl/bench -r benchmarks/requirements.txt \
    || echo "benchmark requirements not installed: python3 -m benchmarks will skip its plot"
fi
# The GPU image's default g++ (/opt/gcc) links libstdc++ statically into shared objects; with
# -Bsymbolic-functions the extension then runs its own uninitialised copy of iostreams and crashes
# inside the cuDNN frontend. Build with the system compiler, which links libstdc++.so.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
t0=$(date +%s)
# In-place build: the ninja objects in build/ survive between calls on a warm machine.
MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; exit 1; }
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
echo "build: $(( $(date +%s) - t0 )) s"
if nm -C --defined-only python/cudnn_flex/_C*.so | grep -q "codecvt_utf8_base"; then
  echo "libstdc++ was linked statically into the extension: use a compiler that links it dynamically"; exit 1
fi
LOG=${OUT:-/tmp}/gpu_check.log
# REPORT: gpu_report.py flags before the tests (default --broadcast); BENCH=0 skips the timings.
python3 scripts/gpu_report.py ${REPORT---broadcast} 2>&1 | tee "$LOG.report"
python3 -m pytest -q -m gpu tests/python --tb=line -p no:cacheprovider "$@" 2>&1 | tee "$LOG" | tail -60
if [ "${BENCH:-1}" != 0 ]; then
  python3 scripts/gpu_report.py --bench 2>&1 | tee -a "$LOG.report" | tail -15
fi
