#!/usr/bin/env bash
# Run a command inside a private network namespace that has only loopback.
#
# Why: Ray 2.60 will not bind a node to 127.0.0.1 when the machine has another address (it swaps in the machine's
# address). Inside a namespace with only `lo`, Ray's node IP is 127.0.0.1 and everything (raylet, GCS, dashboard,
# job submission, metrics) stays on loopback. Needs root or unprivileged user namespaces; where `unshare -n` is not
# permitted the command runs directly (set VZERO_NO_NETNS=1 to force that).
set -euo pipefail
if [ "${VZERO_NO_NETNS:-0}" != 1 ] && [ -z "${VZERO_IN_NETNS:-}" ] && command -v unshare >/dev/null 2>&1 \
   && unshare -n true 2>/dev/null; then
  export VZERO_IN_NETNS=1
  exec unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' "$@"
fi
exec "$@"
