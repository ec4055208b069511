#!/usr/bin/env bash
# The README's test command: installs, builds, then runs the C++ (ctest) and Python (pytest) tests.
# GPU tests run when a CUDA GPU is present and skip cleanly otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Each stage says when it is done (seconds since the start): CI has 90 minutes in all.
stage() { echo "test.sh: $1 done at ${SECONDS} s"; }
bash scripts/install.sh
stage "install and build"

if ! ls /usr/include/gtest/gtest.h >/dev/null 2>&1; then
  if command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev cmake >/dev/null
  fi
fi
if ls /usr/include/gtest/gtest.h >/dev/null 2>&1; then
  cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/cpp -j 2 >/dev/null
  (cd build/cpp && ctest --output-on-failure)
  # The same tests under ThreadSanitizer (about 15 s from scratch on 2 cores).
  bash scripts/tsan.sh
  stage "C++ tests (ctest, tsan)"
else
  echo "gtest is not installed and apt-get is unavailable: C++ tests not run" >&2
  exit 1
fi
# Planted bugs must each fail the CPU suite (about 17 minutes on 2 cores, most bugs caught by the
# one test remembered for them); MUTATION=0 skips it.
if [ "${MUTATION:-1}" != 0 ]; then
  "$PY" scripts/mutation_check.py
  stage "mutation check"
fi
# The benchmark's own requirements (matplotlib, not the library's), so that its plot test runs.
"$PY" -m pip install -q -r benchmarks/requirements.txt \
  || echo "benchmark requirements not installed: the benchmark's plot test skips" >&2
"$PY" -m pytest -q tests/python "$@"
