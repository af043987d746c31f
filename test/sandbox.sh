#!/usr/bin/env bash
# Run a command the way the grand-challenge container runs the algorithm, without Docker, using
# bubblewrap (apt-get install -y bubblewrap):
#   - uid/gid 1000 (when called as root, bwrap itself is started as uid 1000 through setpriv, so the
#     process really is unprivileged on the host, not root mapped to 1000), no new privileges;
#   - no network: a private network namespace with loopback only;
#   - a read-only root: a tmpfs root remounted read-only holding read-only binds of /usr, /etc, the venv
#     (at its own path: console scripts have absolute shebangs) and the app at /opt/app (only what the
#     Dockerfile copies: APP_PATHS); the input read-only at /input; writable: /output and /tmp only;
#   - /dev/shm a 128 MB tmpfs (docker run --shm-size 128m), processes limited with RLIMIT_NPROC
#     (bwrap has no pids limit; note that RLIMIT_NPROC counts every process AND thread of the host uid,
#     also those outside the sandbox, where docker's --pids-limit counts the container's tasks only);
#   - a clear environment holding the Dockerfile's ENV, with /etc/passwd naming uid 1000 "user".
# Not imitated: the memory limit (needs a cgroup) and GPUs (the sandbox sees no /dev/nvidia*).
#
# Usage: test/sandbox.sh [--venv DIR] [--input DIR] [--output DIR] [--app DIR] [--model DIR]
#                        [--env NAME=VALUE]... [--shm-mb N] [--nproc N] [-- command...]
#   --venv    a venv built with Debian's /usr/bin/python3 (test/make_sandbox_venv.sh; interpreters
#             under /root, like pyenv's, are unreadable to uid 1000); default $CBCTSEG_SANDBOX_VENV
#   --input   mounted read-only at /input (default: test/input)
#   --output  mounted read-write at /output (default: out/sandbox; created; when run as root its top
#             folder is given to uid 1000, as a fresh docker volume belongs to the image's user)
#   --app     the repository whose APP_PATHS are mounted at /opt/app (default: this repository)
#   --model   mounted read-only at /opt/ml/model, as grand-challenge does with a model tarball
#   command   default: the image's entrypoint, python -u /opt/app/process.py
# The exit status is the command's. All paths given must be readable by uid 1000.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# What the Dockerfile copies to /opt/app, and its ENV (test/test_container.py checks both against it).
APP_PATHS=(process.py cbctseg resources weights)
IMAGE_ENV=(
  HOME=/tmp
  XDG_CACHE_HOME=/tmp/.cache
  TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
  TRITON_CACHE_DIR=/tmp/triton
  MPLCONFIGDIR=/tmp/matplotlib
  nnUNet_raw=/tmp/nnUNet_raw
  nnUNet_preprocessed=/tmp/nnUNet_preprocessed
  nnUNet_results=/tmp/nnUNet_results
  PYTHONDONTWRITEBYTECODE=1
  PYTHONUNBUFFERED=1
  LANG=C.UTF-8  # set by the python:3.11-slim base image
)

venv="${CBCTSEG_SANDBOX_VENV:-}"
input="$repo/test/input"
output="$repo/out/sandbox"
app="$repo"
model=""
shm_mb=128
nproc=256
extra_env=()
die() { echo "sandbox: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --venv) venv="${2:?--venv needs a folder}"; shift 2 ;;
    --input) input="${2:?--input needs a folder}"; shift 2 ;;
    --output) output="${2:?--output needs a folder}"; shift 2 ;;
    --app) app="${2:?--app needs a folder}"; shift 2 ;;
    --model) model="${2:?--model needs a folder}"; shift 2 ;;
    --env) extra_env+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
    --shm-mb) shm_mb="${2:?--shm-mb needs a number}"; shift 2 ;;
    --nproc) nproc="${2:?--nproc needs a number}"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
cmd=("$@")
if ((${#cmd[@]} == 0)); then
  cmd=(python -u /opt/app/process.py)
fi

command -v bwrap >/dev/null || die "bwrap not found (apt-get install -y bubblewrap)"
[[ -n "$venv" ]] || die "no venv: pass --venv DIR or set CBCTSEG_SANDBOX_VENV (test/make_sandbox_venv.sh DIR)"
# Absolute, but symlinks kept: the venv must appear at the path it was built at.
venv="$(realpath -s "$venv")"; input="$(realpath "$input")"; app="$(realpath "$app")"
[[ -x "$venv/bin/python" ]] || die "$venv/bin/python not found"
[[ -d "$input" ]] || die "input $input is not a folder"
mkdir -p "$output"
output="$(realpath "$output")"

launcher=(prlimit "--nproc=$nproc:$nproc")
if [[ "$(id -u)" == 0 ]]; then
  chown 1000:1000 "$output"
  launcher=(setpriv --reuid=1000 --regid=1000 --clear-groups --no-new-privs "${launcher[@]}")
  # A clear message for the usual mistake: an interpreter (pyenv) or a folder under /root.
  for path in "$venv/bin/python" "$input" "$app/process.py"; do
    setpriv --reuid=1000 --regid=1000 --clear-groups test -r "$path" \
      || die "uid 1000 cannot read $path (keep venv, app and input outside /root; see --help)"
  done
fi

# /tmp first: binds below may live under the host's /tmp (mktemp folders) and must not be hidden by it.
args=(--unshare-all --die-with-parent --new-session --uid 1000 --gid 1000 --tmpfs / --tmpfs /tmp)
# /usr and the top-level links into it (merged /usr), or the folders themselves where they are not links.
args+=(--ro-bind /usr /usr)
for d in bin sbin lib lib32 lib64 libx32; do
  if [[ -L "/$d" ]]; then
    args+=(--symlink "$(readlink "/$d")" "/$d")
  elif [[ -d "/$d" ]]; then
    args+=(--ro-bind "/$d" "/$d")
  fi
done
args+=(--ro-bind /etc /etc --ro-bind-data 3 /etc/passwd --ro-bind-data 4 /etc/group)
args+=(--ro-bind "$venv" "$venv" --dir /opt/app)
for p in "${APP_PATHS[@]}"; do
  [[ -e "$app/$p" ]] || die "$app/$p missing (the image copies it)"
  args+=(--ro-bind "$app/$p" "/opt/app/$p")
done
if [[ -n "$model" ]]; then
  args+=(--ro-bind "$(realpath "$model")" /opt/ml/model)
fi
args+=(--ro-bind "$input" /input --bind "$output" /output)
args+=(--proc /proc --dev /dev --perms 1777 --size $((shm_mb * 1024 * 1024)) --tmpfs /dev/shm)
args+=(--remount-ro / --chdir /opt/app --clearenv)
args+=(--setenv PATH "$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
for kv in "${IMAGE_ENV[@]}" ${extra_env[@]+"${extra_env[@]}"}; do
  args+=(--setenv "${kv%%=*}" "${kv#*=}")
done

echo "sandbox: uid 1000, no network, read-only root; /input=$input /output=$output${model:+ /opt/ml/model=$model}" >&2
exec "${launcher[@]}" bwrap "${args[@]}" -- "${cmd[@]}" \
  3<<<"root:x:0:0:root:/root:/usr/sbin/nologin
user:x:1000:1000::/tmp:/usr/sbin/nologin" \
  4<<<"root:x:0:
user:x:1000:"
