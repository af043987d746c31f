#!/usr/bin/env bash
# Create (or reuse) the venv of the Triton test server (requirements-triton.txt). With --client, also
# install the client side into the project's venv when it lacks it (tritonclient, and onnx, onnxscript,
# onnxruntime for export-triton); without, only say what is missing there.
# Idempotent: a second run checks and returns in seconds.
# Usage: scripts/setup_triton_env.sh [--client]
#
# CBCTSEG_TRITON_VENV   where the server venv goes (default: .venv-triton in the repository)
# CBCTSEG_TRITON_PYTHON the interpreter for it. Default: Debian's /usr/bin/python3.11, else python3.
#                       PyTriton's python backend stub links libpython3.X.so.1.0 through the library
#                       path, so the interpreter must be a shared build whose library is that one.
# CBCTSEG_VENV          the project's venv (default: .venv)
set -euo pipefail
install_client=0
if [[ "${1:-}" == --client ]]; then install_client=1; elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--client]" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CBCTSEG_TRITON_VENV:-$repo/.venv-triton}"
main_venv="${CBCTSEG_VENV:-$repo/.venv}"
# the client side, as requirements.txt and requirements-dev.txt pin it
client=("tritonclient[grpc]==2.73.0" "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0")

python="${CBCTSEG_TRITON_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x /usr/bin/python3.11 ]]; then python=/usr/bin/python3.11; else python="$(command -v python3)"; fi
fi
if ! "$python" -c 'import sys; sys.exit(not (3, 8) <= sys.version_info[:2] <= (3, 13))'; then
  echo "setup-triton: $python is not Python 3.8 to 3.13 (PyTriton 0.7.0 has backend stubs for those)" >&2
  exit 1
fi
# shellcheck source=scripts/venv_support.sh
source "$repo/scripts/venv_support.sh"
ensure_venv_support "$python" setup-triton
if ! "$python" -c 'import os, sys, sysconfig as s
name = s.get_config_var("INSTSONAME") or ""
sys.exit(not (".so" in name and os.path.exists(os.path.join(s.get_config_var("LIBDIR"), name))))'; then
  echo "setup-triton: $python has no shared libpython (Debian: apt-get install libpython3-dev;" \
       "pyenv: build with --enable-shared), which the Triton python backend needs" >&2
  exit 1
fi

stamp="$venv/.requirements.sha256"
want="$( (cat "$repo/requirements-triton.txt"; "$python" -VV) | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup-triton: $venv is up to date" >&2
else
  echo "setup-triton: installing requirements-triton.txt into $venv (about 20 s, 450 MB)" >&2
  if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
    echo "setup-triton: $venv exists and is not a venv; not replacing it" >&2
    exit 1
  fi
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # ignored by git wherever it lies, without touching the repository's .gitignore (what venv does from 3.13)
  echo '*' > "$venv/.gitignore"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$repo/requirements-triton.txt"
  "$venv/bin/python" -c 'import pytriton.triton, onnxruntime, tritonclient.grpc'
  echo "$want" > "$stamp"
fi

if [[ ! -x "$main_venv/bin/python" ]]; then
  echo "setup-triton: no project venv at $main_venv (scripts/setup.sh makes it); client side not checked" >&2
  [[ "$install_client" == 0 ]] || exit 1
elif ! "$main_venv/bin/python" -c 'import tritonclient.grpc, onnx, onnxscript, onnxruntime' 2>/dev/null; then
  if [[ "$install_client" == 1 ]]; then
    echo "setup-triton: installing the client side into $main_venv: ${client[*]}" >&2
    "$main_venv/bin/python" -m pip install -q --disable-pip-version-check "${client[@]}"
  else
    echo "setup-triton: $main_venv lacks the client side; rerun with --client to install ${client[*]}" >&2
  fi
fi
echo "setup-triton: done" >&2
