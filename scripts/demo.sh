#!/usr/bin/env bash
# The README's demo command: installs, builds, and runs the demo (cuDNN on a GPU, the reference
# path on a CPU-only machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
"${PYTHON:-python3}" -m cudnn_flex demo
