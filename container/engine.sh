#!/usr/bin/env bash
# The container engine for build.sh, test.sh, export.sh, .ci/run and the image tests: Docker where a Docker
# daemon answers, else podman. CBCTSEG_ENGINE=docker|podman chooses one.
#
# Sourced: `source container/engine.sh; engine_setup` sets CBCTSEG_ENGINE and, for podman, what it needs;
# then `engine ARGS...` runs it. Executed: `container/engine.sh ARGS...` does the same in one step (the tests
# use that), and `container/engine.sh --name` prints the engine's name.
#
# podman, always: BUILDAH_FORMAT=docker. podman's default image format (OCI) has no SHELL instruction, so
# the Dockerfile's `SHELL [... pipefail ...]` would be dropped with only a warning.
# podman, on hosts where its defaults cannot start a container (and only when CONTAINERS_CONF is not set
# already): a containers.conf of our own, in the user's cache folder. Two cases are detected:
#   - root without CAP_SYS_RESOURCE (some CI and VM sandboxes): podman raises every container's nofile and
#     nproc limits to 1048576, which setrlimit refuses there (EPERM); the file sets them to what the host
#     allows instead;
#   - cgroup v1 or hybrid hierarchies with runc installed: crun refuses them ("drop all controllers from
#     cgroupv2"); the file picks runc.
# A machine with a normal podman (rootless, or root with all capabilities, on cgroup v2) is left alone.

# engine_setup: choose the engine; fails with a message when there is none.
engine_setup() {
  if [[ -z "${CBCTSEG_ENGINE:-}" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
      CBCTSEG_ENGINE=docker
    elif command -v podman >/dev/null; then
      CBCTSEG_ENGINE=podman
    else
      echo "container: neither a Docker daemon (docker info) nor podman found" >&2
      return 1
    fi
  fi
  case "$CBCTSEG_ENGINE" in
    docker) ;;
    podman) _engine_podman_setup ;;
    *) echo "container: CBCTSEG_ENGINE must be docker or podman, not '$CBCTSEG_ENGINE'" >&2; return 1 ;;
  esac
  export CBCTSEG_ENGINE
}

# engine ARGS...: the chosen engine (engine_setup first).
engine() { "${CBCTSEG_ENGINE:?engine_setup first}" "$@"; }

# True when this process holds CAP_SYS_RESOURCE (capability 24) in its effective set.
_engine_has_cap_sys_resource() {
  local caps
  caps="$(awk '/^CapEff:/ {print $2}' /proc/self/status 2>/dev/null)"
  [[ -n "$caps" ]] && (( (16#$caps >> 24) & 1 ))
}

# True when /sys/fs/cgroup is a cgroup v1 or hybrid hierarchy (not a pure cgroup2 mount).
_engine_cgroup_v1() {
  [[ -d /sys/fs/cgroup ]] && [[ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ]]
}

_engine_podman_setup() {
  export BUILDAH_FORMAT=docker
  [[ -z "${CONTAINERS_CONF:-}" ]] || return 0
  local ulimits="" runtime=""
  if [[ "$(id -u)" == 0 ]] && ! _engine_has_cap_sys_resource; then
    local nofile nproc
    nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"
    [[ "$nofile" == unlimited ]] && nofile=1048576
    [[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
    ulimits="default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
  fi
  if _engine_cgroup_v1 && command -v runc >/dev/null; then
    runtime='runtime = "runc"'
  fi
  [[ -n "$ulimits" || -n "$runtime" ]] || return 0
  local dir="${XDG_CACHE_HOME:-$HOME/.cache}/cbctseg"
  mkdir -p "$dir"
  printf '[containers]\n%s\n[engine]\n%s\n' "$ulimits" "$runtime" > "$dir/containers.conf"
  export CONTAINERS_CONF="$dir/containers.conf"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  engine_setup
  if [[ "${1:-}" == --name ]]; then
    echo "$CBCTSEG_ENGINE"
  else
    engine "$@"
  fi
fi
