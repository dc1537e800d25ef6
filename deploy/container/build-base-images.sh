#!/usr/bin/env bash
# Local stand-ins for the registry base images, for machines that reach no image registry.
#
#   localhost/solobot-standin/debian:bookworm   debootstrap (minbase) from this machine's apt
#                                               mirror, imported; with the host's extra CAs
#   docker.io/library/python:3.11-slim          the Dockerfile's FROM: Debian's python3 (3.11)
#                                               in a venv on PATH as `python`/`pip`
#   localhost/solobot-standin/postgres:15       Debian's PostgreSQL 15, initialised UTF-8 from
#                                               POSTGRES_USER/PASSWORD/DB like the official one
#
# The python stand-in takes the official image's name so that the Dockerfile stays the one a
# Docker Hub user builds; its label solobot.standin says what it really is. Each image carries a
# content hash (this script, its build context, the mirror, the host's extra CAs) and is rebuilt
# only when that hash changes, so a second run costs a few `podman image inspect` calls.
#
# Usage: build-base-images.sh [--force]        (root; deploy/container/setup-podman.sh first)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SUITE=bookworm
DEBIAN_IMAGE=localhost/solobot-standin/debian:$SUITE
PYTHON_IMAGE=docker.io/library/python:3.11-slim
POSTGRES_IMAGE=localhost/solobot-standin/postgres:15
HASH_LABEL=solobot.standin.hash
EXTRA_CA_DIR=/usr/local/share/ca-certificates
FORCE=${1:-}
rootfs=""
trap '[[ -z $rootfs ]] || rm -rf "$rootfs" "$rootfs.log"' EXIT

# The Debian mirror this machine's apt uses for $SUITE (one-line and deb822 sources alike).
apt_mirror() {
  local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
  local f
  for f in "${files[@]}"; do [[ -f $f ]] || continue
    awk -v suite="$SUITE" '
      /^deb[ \t]/ { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { url = $i; s = $(i + 1); break }
                    if (s == suite) { print url; exit } }
      /^URIs:/   { url = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) { print url; exit } }
      /^$/       { url = "" }' "$f"
  done | head -n1
}

MIRROR=$(apt_mirror)
MIRROR=${MIRROR:-http://deb.debian.org/debian}

hash_of() { sha256sum | cut -c1-16; }
extra_cas() { find "$EXTRA_CA_DIR" -type f -name '*.crt' 2>/dev/null | sort; }
current_hash() { podman image inspect --format "{{index .Config.Labels \"$HASH_LABEL\"}}" "$1" 2>/dev/null || true; }
up_to_date() { [[ $FORCE != --force && "$(current_hash "$1")" == "$2" ]]; }

DEBIAN_HASH=$( { cat "$0"; echo "$MIRROR"; extra_cas | xargs -r cat; } | hash_of)
PYTHON_HASH=$( { echo "$DEBIAN_HASH"; cat "$HERE"/standin/python/*; } | hash_of)
POSTGRES_HASH=$( { echo "$DEBIAN_HASH"; cat "$HERE"/standin/postgres/*; } | hash_of)

build_debian() {
  if up_to_date "$DEBIAN_IMAGE" "$DEBIAN_HASH"; then echo "== $DEBIAN_IMAGE up to date"; return; fi
  local t0=$SECONDS
  rootfs=$(mktemp -d /var/tmp/solobot-rootfs.XXXXXX)
  echo "== debootstrap $SUITE from $MIRROR"
  debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -n 30 "$rootfs.log"; return 1; }
  # The host's extra CAs: pip and apt inside the builds go through the same TLS-inspecting proxy.
  extra_cas | while read -r crt; do cp "$crt" "$rootfs$EXTRA_CA_DIR/"; done
  chroot "$rootfs" update-ca-certificates >/dev/null
  # As Docker's debian images: no service starts during a build, no recommends, no apt cache.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
  printf 'APT::Install-Recommends "0";\nAPT::Install-Suggests "0";\n' >"$rootfs/etc/apt/apt.conf.d/90solobot-standin"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
  tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
    --change "LABEL $HASH_LABEL=$DEBIAN_HASH" \
    --change "LABEL solobot.standin=debootstrap-$SUITE-minbase" \
    - "$DEBIAN_IMAGE" >/dev/null
  echo "== $DEBIAN_IMAGE built in $((SECONDS - t0)) s"
}

build_from_debian() {  # image hash context-dir
  if up_to_date "$1" "$2"; then echo "== $1 up to date"; return; fi
  local t0=$SECONDS
  podman build --quiet --format docker --pull=never --network host \
    --build-arg "BASE=$DEBIAN_IMAGE" --label "$HASH_LABEL=$2" -t "$1" "$3" >/dev/null
  echo "== $1 built in $((SECONDS - t0)) s"
}

build_debian
build_from_debian "$PYTHON_IMAGE" "$PYTHON_HASH" "$HERE/standin/python"
build_from_debian "$POSTGRES_IMAGE" "$POSTGRES_HASH" "$HERE/standin/postgres"
podman image prune -f >/dev/null  # dangling layers of earlier builds
