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
if [ -n "${PREBUILT:-}" ]; then
  # An extension built by an earlier call (its $OUT/so, carried back): skips the ~150 s build.
  cp "$PREBUILT" python/cudnn_flex/ || exit 1
else
  # In-place build: the ninja objects in build/ survive between calls on a warm machine.
  MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; exit 1; }
  if [ -n "${OUT:-}" ]; then  # for PREBUILT= on the next call
    mkdir -p "$OUT/so" && cp python/cudnn_flex/_C*.so "$OUT/so/" && strip --strip-debug "$OUT"/so/*.so
  fi
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
echo "build: $(( $(date +%s) - t0 )) s"
if nm -C --defined-only python/cudnn_flex/_C*.so | grep -q "codecvt_utf8_base"; then
  echo "libstdc++ was linked statically into the extension: use a compiler that links it dynamically"; exit 1
fi
LOG=${OUT:-/tmp}/gpu_check.log
# REPORT: gpu_report.py flags before the tests (default --broadcast); BENCH=0 skips the timings.
python3 scripts/gpu_report.py ${REPORT---broadcast} 2>&1 | tee "$LOG.report"
# -v: each result is in the log as it finishes, so a run cut off by TEST_TIMEOUT still says which
# tests failed; the tracebacks come at the end (--tb=short). JOBS=1 for the timing-free serial run.
timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -v -m gpu -n "${JOBS:-8}" --tb=short -rf -p no:cacheprovider \
  "${@:-tests/python}" > "$LOG" 2>&1
echo "pytest exit: $? (124: cut off after ${TEST_TIMEOUT:-420} s)"
echo "passed: $(grep -c ' PASSED ' "$LOG"), failed: $(grep -c ' FAILED ' "$LOG")"
grep ' FAILED ' "$LOG" | sed 's/.* FAILED //' | sort -u | head -40
grep -E '^E ' "$LOG" | cut -c1-300 | head -40
tail -3 "$LOG"
if [ "${BENCH:-1}" != 0 ]; then
  python3 scripts/gpu_report.py --bench 2>&1 | tee -a "$LOG.report" | tail -15
fi
