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
# The flash tests start a real OpenSSH server on 127.0.0.1 (and edgequee flash uses the ssh client).
if ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null; then
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client >/dev/null
  else
    echo "note: sshd is missing and cannot be installed here (needs root or sudo with apt-get): install openssh-server" \
         "for the flash tests (they skip without it, and fail under CI=true)" >&2
  fi
fi
echo "edgequee set up in $(pwd)/.venv ($(python -c 'import torch, tensorflow, ai_edge_litert; print("torch", torch.__version__, "/ tensorflow", tensorflow.__version__)' 2>/dev/null))"
