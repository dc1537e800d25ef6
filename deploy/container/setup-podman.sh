#!/usr/bin/env bash
# Rootful podman from Debian's packages, configured for machines like ours (and CI's).
#
# Why each piece:
# - runc, not crun: crun refuses a host whose cgroups are mixed v1/v2 (ours are).
# - default_ulimits: rootful podman asks for RLIMIT_NOFILE/NPROC 1048576 by default, above this
#   machine's hard limits; raising a hard limit needs a privilege we lack, so every container
#   start fails. We ask for the machine's own hard limits instead (nproc: see PODMAN_NPROC).
# - catatonit: the init that `podman run --init` / compose's `init: true` put in as PID 1.
# - netavark + aardvark-dns + iptables: compose's project network, with service names in DNS.
# - debootstrap: the local stand-in base images (deploy/container/build-base-images.sh).
# - podman-compose: Debian's, so that `docker-compose.yml` is exercised by a second engine.
#
# Idempotent: installs only what is missing, rewrites containers.conf only when it changes.
set -euo pipefail

PACKAGES=(podman runc catatonit conmon netavark aardvark-dns iptables debootstrap podman-compose)
CONF=/etc/containers/containers.conf
MARKER="# solobot: written by deploy/container/setup-podman.sh"

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# podman 4.3 itself runs with RLIMIT_NPROC 32768 (seen in /proc/PID/limits of podman and conmon,
# whatever the machine allows), and runc cannot give a container more than it has.
PODMAN_NPROC=32768
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
if [[ $nproc == unlimited ]] || ((nproc > PODMAN_NPROC)); then nproc=$PODMAN_NPROC; fi
want="$MARKER
[containers]
# Never above the machine's hard limits (podman's default nofile=1048576 is).
default_ulimits = [\"nofile=${nofile}:${nofile}\", \"nproc=${nproc}:${nproc}\"]

[engine]
# crun refuses mixed cgroup v1/v2 hosts; runc copes.
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"
"
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "${want%$'\n'}" ]]; then
  mkdir -p "$(dirname "$CONF")"
  if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    cp -p "$CONF" "$CONF.before-solobot"
    echo "== kept the previous $CONF as $CONF.before-solobot"
  fi
  printf '%s' "$want" >"$CONF"
  echo "== wrote $CONF (runc, nofile=$nofile, nproc=$nproc)"
fi
podman --version
