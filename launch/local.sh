#!/usr/bin/env bash
# Runs a ctm-jax command on this machine.
#
#   launch/local.sh [--cpu_devices=N] COMMAND [ARGS...]
#
# --cpu_devices=N splits the host CPU into N XLA devices, to exercise sharded
# code without accelerators (the test suite uses 8). On GPUs, memory is
# allocated on demand so several local runs can share a card.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == --cpu_devices=* ]]; then
  n="${1#--cpu_devices=}"
  if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/local.sh: --cpu_devices must be a positive integer, got '$n'" >&2
    exit 2
  fi
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$n"
  shift
fi
if [[ $# -eq 0 ]]; then
  echo "usage: launch/local.sh [--cpu_devices=N] COMMAND [ARGS...]" >&2
  exit 2
fi
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export PYTHONUNBUFFERED=1
exec "$@"
