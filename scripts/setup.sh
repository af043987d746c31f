#!/usr/bin/env bash
# Create (or reuse) the virtual environment with the pinned requirements; idempotent.
# CBCTSEG_VENV chooses where (default: .venv in the repository). Debian's /usr/bin/python3 is preferred:
# a non-root user can run it, unlike interpreters kept under /root.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CBCTSEG_VENV:-$repo/.venv}"
python="${CBCTSEG_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x /usr/bin/python3 ]]; then python=/usr/bin/python3; else python="$(command -v python3)"; fi
fi

# shellcheck source=scripts/venv_support.sh
source "$repo/scripts/venv_support.sh"
ensure_venv_support "$python" setup

stamp="$venv/.requirements.sha256"
want="$(cat "$repo/requirements.txt" "$repo/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $venv is up to date" >&2
  exit 0
fi
echo "setup: installing the pinned requirements into $venv (a few minutes, about 6 GB)" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2> >(pip_log)
"$venv/bin/python" -m pip install -q -r "$repo/requirements.txt" -r "$repo/requirements-dev.txt" \
  2> >(pip_log)
echo "$want" > "$stamp"
echo "setup: done" >&2
