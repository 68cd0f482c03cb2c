#!/usr/bin/env bash
# Set up edgequee with every extra (host, device, camera, dev) in ./.venv. Idempotent; safe to re-run.
#
# torch is installed first from constraints/cpu-torch.txt: on these machines `torch==2.13.0` is a CPU build on
# local disk, while a bare "torch" requirement resolves to a multi-GB CUDA build. pyproject.toml keeps a wide
# range for real users; elsewhere, install torch your own way first (e.g. the PyTorch CPU index) and this
# script leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q -c constraints/cpu-torch.txt torch
fi
python -m pip install -q -c constraints/cpu-torch.txt -e '.[host,device,camera,dev]'
echo "edgequee set up in $(pwd)/.venv ($(python -c 'import torch, tensorflow, ai_edge_litert; print("torch", torch.__version__, "/ tensorflow", tensorflow.__version__)' 2>/dev/null))"
