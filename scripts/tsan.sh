#!/usr/bin/env bash
# ThreadSanitizer build of the C++ core tests (graph key, LRU graph cache), run once. Covers the
# concurrent-callers and stress tests of tests/cpp/test_graph_cache.cpp (threads looking up, building,
# failing builds, clear() and set_capacity() at once). Needs cmake, g++ (its libtsan) and libgtest-dev;
# scripts/test.sh installs those. Exits non-zero on any race report or failed test.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${TSAN_BUILD_DIR:-build/tsan}

cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCUDNN_FLEX_TSAN=ON >/dev/null
cmake --build "$BUILD" -j 2 >/dev/null
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() { "$@" "$BUILD/test_core" >"$log" 2>&1; }
if ! run; then
  if grep -q "unexpected memory mapping" "$log" && command -v setarch >/dev/null; then
    # gcc 12's TSan cannot place its shadow memory when the kernel randomizes mmap with more bits
    # than it expects (vm.mmap_rnd_bits > 28 on newer kernels): run without address randomization.
    echo "tsan: ThreadSanitizer refused this kernel's memory layout; rerunning under setarch -R" >&2
    run setarch "$(uname -m)" -R || { cat "$log"; exit 1; }
  else
    cat "$log"
    exit 1
  fi
fi
grep -E "^\[ +(PASSED|FAILED|SKIPPED) +\]|tests? from .* ran" "$log"
echo "tsan: no data race reported"
