#!/usr/bin/env bash
# Start (or reuse) a private dockerd and build the local CI image, with no registry.
#
#   .ci/docker-up.sh         install docker.io + debootstrap if missing, start dockerd, build image
#   .ci/docker-up.sh down    stop the dockerd this script started
#
# The image is a Debian bookworm minbase rootfs (debootstrap, with the shared libraries the host's
# Python and torch link against) imported with `docker import`. Jobs bind-mount the host venv and
# interpreter read-only (executors.docker does it), so the image carries no Python packages.
# Clients need DOCKER_HOST=unix://$NEMO_AUTOMODEL_DOCKER_DIR/docker.sock (the test fixture sets it).
# Idempotent: a live dockerd and an existing image are reused.
set -euo pipefail
D="${NEMO_AUTOMODEL_DOCKER_DIR:-/var/tmp/nemo-automodel-ci/docker}"
IMAGE="${NEMO_AUTOMODEL_DOCKER_IMAGE:-nemo-automodel-ci:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LIBS=libsqlite3-0,libreadline8,libgomp1,libffi8,libssl3,libuuid1,libbz2-1.0,liblzma5,libncursesw6,zlib1g,libexpat1
export DOCKER_HOST="unix://$D/docker.sock"
log() { echo "[docker-up] $*" >&2; }
alive() { local p; p=$(cat "$D/dockerd.pid" 2>/dev/null) && [[ -n "$p" ]] && ps -o stat= -p "$p" 2>/dev/null | grep -qv '^Z'; }

if [[ "${1:-}" == down ]]; then
  if alive; then
    kill "$(cat "$D/dockerd.pid")"
    for ((i = 0; i < 150; i++)); do alive || break; sleep 0.2; done
    log "stopped dockerd"
  fi
  exit 0
fi

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  [[ $(id -u) == 0 ]] || { log "dockerd/debootstrap missing and not root: cannot apt-get install"; exit 1; }
  log "installing docker.io debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq docker.io debootstrap >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq docker.io debootstrap >/dev/null; }
fi
# The docker.io client talks to its own daemon; a newer client earlier on PATH works too.
DOCKER=$(command -v docker || echo /usr/bin/docker)

mkdir -p "$D"
if ! alive; then
  log "starting dockerd on $DOCKER_HOST"
  rm -f "$D/docker.sock"
  setsid dockerd --data-root "$D/root" --exec-root "$D/exec" -H "$DOCKER_HOST" --pidfile "$D/dockerd.pid" \
    </dev/null >>"$D/dockerd.log" 2>&1 &
fi
for ((i = 0; i < 150; i++)); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.2; done
"$DOCKER" info >/dev/null || { log "dockerd did not come up; see $D/dockerd.log"; tail -5 "$D/dockerd.log" >&2; exit 1; }

if ! "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  rootfs="$D/rootfs"
  if [[ ! -f "$rootfs/.complete" ]]; then
    log "debootstrap bookworm minbase into $rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="$LIBS" bookworm "$rootfs" "$MIRROR" >"$D/debootstrap.log" 2>&1 \
      || { log "debootstrap failed; see $D/debootstrap.log"; tail -5 "$D/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
  fi
  log "importing $IMAGE"
  tar -C "$rootfs" --exclude=./.complete -c . | "$DOCKER" import -c 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
fi
log "up: DOCKER_HOST=$DOCKER_HOST image=$IMAGE"
