#!/usr/bin/env bash
# The container test (issue 12), as CI runs it: rootful podman from Debian's packages, the local
# stand-in base images (built once, reused while their content hash holds), then the image built
# from this checkout and run for real (tests/container/checks.py). Leaves nothing running.
#
#   bash tests/container/run.sh        (root; uses .venv/bin/python when there is one)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=.venv/bin/python
[[ -x $PYTHON ]] || PYTHON=python3

sweep() {  # whatever an interrupted run of checks.py may have left, by label
  command -v podman >/dev/null || return 0
  local label ids
  for label in solobot.test=container io.podman.compose.project=solobotct; do
    ids=$(podman ps -aq --filter "label=$label" 2>/dev/null || true)
    # shellcheck disable=SC2086 # one word per id
    [[ -z $ids ]] || podman rm -f -v -t 0 $ids >/dev/null 2>&1 || true
  done
}
trap sweep EXIT

echo "== container test: podman setup"
t0=$SECONDS
bash deploy/container/setup-podman.sh
export SOLOBOT_CT_SETUP_S=$((SECONDS - t0))

echo "== container test: stand-in base images"
t0=$SECONDS
bash deploy/container/build-base-images.sh
export SOLOBOT_CT_BASE_S=$((SECONDS - t0))

echo "== container test: checks"
"$PYTHON" -m tests.container.checks "$@"
