#!/usr/bin/env bash
# Installs everything cudnn-flex needs on a fresh machine and builds the extension in place.
# Uses the torch already installed when there is one (the GPU machine has its own), else the pinned one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.14.1"
fi
# Header-only cuDNN frontend (pinned: the bridge follows its API); --no-deps keeps its optional
# Python DSL dependencies out. cuDNN itself comes with torch's nvidia-cudnn wheel.
"$PY" -c "import importlib.metadata as m; assert m.version('nvidia-cudnn-frontend') == '1.32.0'" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps "nvidia-cudnn-frontend==1.32.0"
"$PY" -m pip install -q pytest hypothesis ninja setuptools wheel
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
