# shellcheck shell=bash
# Sourced by the scripts that install packages: make sure PYTHON can create virtual environments, and keep pip's
# log readable.
# ensure_venv_support PYTHON NAME: installs Debian's python3-venv when run as root, else fails with a hint.
ensure_venv_support() {
  local python="$1" name="$2"
  "$python" -c 'import ensurepip, venv' 2>/dev/null && return 0
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "$name: installing python3-venv" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "$name: $python cannot create virtual environments (install python3-venv)" >&2
    exit 1
  fi
}

# pip_log: filter for pip's stderr (`2> >(pip_log)`): this machine's pip configuration warns about each of its local
# indexes on every call
pip_log() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }
