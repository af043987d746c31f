#!/usr/bin/env bash
# Build a virtual environment for test/sandbox.sh the way the Dockerfile builds the image's Python:
# torch and torchvision at the Dockerfile's versions (its ARG defaults) first, then every other pin of
# requirements.txt, with torch held by a constraint. The one difference: torch comes from PyPI (its
# default CUDA 13 build, which runs on a CPU) instead of PyTorch's cu126 index, unreachable here.
# Usage: test/make_sandbox_venv.sh DIR
# Debian's /usr/bin/python3 is used on purpose (CBCTSEG_SANDBOX_PYTHON overrides): the sandbox runs as
# uid 1000, and interpreters kept under /root (pyenv) are unreadable to that user. DIR and its parents
# must be readable by uid 1000 too (e.g. /opt/cbctseg-sandbox-venv). Idempotent: nothing is done when
# DIR was built from the same requirements.txt and Dockerfile versions (a sha256 stamp in DIR).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(realpath -s "$1")"
python="${CBCTSEG_SANDBOX_PYTHON:-/usr/bin/python3}"
torch="$(sed -n 's/^ARG TORCH_VERSION=//p' "$repo/Dockerfile")"
torchvision="$(sed -n 's/^ARG TORCHVISION_VERSION=//p' "$repo/Dockerfile")"
[[ -n "$torch" && -n "$torchvision" ]] || { echo "make_sandbox_venv: torch versions not found in the Dockerfile" >&2; exit 1; }

if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  echo "make_sandbox_venv: $python cannot create virtual environments (apt-get install -y python3-venv)" >&2
  exit 1
fi

stamp="$venv/.requirements.sha256"
want="$( (cat "$repo/requirements.txt"; echo "torch==$torch torchvision==$torchvision") | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "make_sandbox_venv: $venv is up to date" >&2
  exit 0
fi

echo "make_sandbox_venv: building $venv (torch $torch, a few minutes, about 6 GB)" >&2
rm -f "$stamp"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --no-cache-dir)
"${pip[@]}" "torch==$torch" "torchvision==$torchvision"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
grep -vE '^(torch|torchvision)==' "$repo/requirements.txt" > "$tmp/requirements.txt"
printf 'torch==%s\ntorchvision==%s\n' "$torch" "$torchvision" > "$tmp/constraints.txt"
"${pip[@]}" -r "$tmp/requirements.txt" -c "$tmp/constraints.txt"
"$venv/bin/python" -m pip check
# The sandbox user (uid 1000) must be able to read everything, whatever root's umask was.
chmod -R a+rX "$venv"
echo "$want" > "$stamp"
echo "make_sandbox_venv: done" >&2
