#!/usr/bin/env bash
# Runs a ctm-jax command on this machine.
#
#   launch/local.sh [--cpu_devices=M] [--processes=N] COMMAND [ARGS...]
#
# --cpu_devices=M splits the host CPU into M XLA devices, to exercise sharded
# code without accelerators (the test suite uses 8). On GPUs, memory is
# allocated on demand so several local runs can share a card.
#
# --processes=N starts N copies of COMMAND here, as the N processes of one
# multi-host run: copy i gets `--coordinator_address=localhost:PORT
# --num_processes=N --process_id=i` appended (PORT: $CTM_COORDINATOR_PORT, or a
# free one) and its output lines are prefixed with `[i] `. With --cpu_devices
# each copy has M CPU devices (N x M in all). If a copy fails, the others get
# SIGTERM (SIGKILL $CTM_KILL_GRACE_S seconds later, default 30) and the script
# exits with the failed copy's status. SIGINT / SIGTERM / SIGHUP are forwarded
# to every copy (the trainer checkpoints and exits); a second one kills them.
# A progress bar prints a line per update, one every $TQDM_MININTERVAL seconds
# (default 10). It is for testing multi-host code: use it with --cpu_devices,
# as copies on a GPU machine would each take every GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: launch/local.sh [--cpu_devices=M] [--processes=N] COMMAND [ARGS...]"

processes=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu_devices=*)
      n="${1#--cpu_devices=}"
      if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "launch/local.sh: --cpu_devices must be a positive integer, got '$n'" >&2
        exit 2
      fi
      export JAX_PLATFORMS=cpu
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$n"
      shift
      ;;
    --processes=*)
      processes="${1#--processes=}"
      if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
        echo "launch/local.sh: --processes must be a positive integer, got '$processes'" >&2
        exit 2
      fi
      shift
      ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "$usage" >&2
  exit 2
fi
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export PYTHONUNBUFFERED=1
if [[ -z "$processes" ]]; then
  exec "$@"
fi

# --- N local processes -------------------------------------------------------

free_port() {
  local py
  for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1 &&
      "$py" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])' 2>/dev/null; then
      return
    fi
  done
  echo $((20000 + RANDOM % 40000))
}

port="${CTM_COORDINATOR_PORT:-$(free_port)}"
if ! [[ "$port" =~ ^[1-9][0-9]*$ ]] || ((port > 65535)); then
  echo "launch/local.sh: CTM_COORDINATOR_PORT must be a port number, got '$port'" >&2
  exit 2
fi
grace="${CTM_KILL_GRACE_S:-30}"
if ! [[ "$grace" =~ ^[0-9]+$ ]]; then
  echo "launch/local.sh: CTM_KILL_GRACE_S must be a whole number of seconds, got '$grace'" >&2
  exit 2
fi
# Each copy's output goes through a relay that prefixes its lines. A carriage
# return ends a line too, so a progress bar (one line redrawn with \r) shows
# as a line per update, one every $TQDM_MININTERVAL seconds.
relay_py='
import re, sys
prefix, out = sys.argv[1].encode(), sys.stdout.buffer
end = re.compile(rb"\r?\n|\r(?=[^\n])")
pending = b""
while True:
    data = sys.stdin.buffer.raw.read(65536)
    if not data:
        break
    *lines, pending = end.split(pending + data)
    out.write(b"".join(prefix + line + b"\n" for line in lines if line))
    out.flush()
pending = pending.rstrip(b"\r")
if pending:
    out.write(prefix + pending + b"\n")
'
relay() {
  if command -v python3 >/dev/null 2>&1; then
    exec python3 -c "$relay_py" "$1"
  elif echo | sed -u 's/^//' >/dev/null 2>&1; then
    exec sed -u "s/^/$1/"  # GNU sed: unbuffered
  else
    exec sed -l "s/^/$1/"  # BSD sed: line-buffered
  fi
}
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-10}"

# Messages go to fd 3, a copy of stderr that survives the 2>/dev/null around
# `sleep`, inside which the signal traps run.
exec 3>&2
say() { echo "launch/local.sh: $*" >&3; }

fifos="$(mktemp -d "${TMPDIR:-/tmp}/ctm_local.XXXXXX")"
pids=()     # the copies of COMMAND, by process id; '' once reaped
relays=()   # their output prefixers
signalled=0
main_pid=$BASHPID

# Signals INT / TERM go to each copy itself, KILL to its whole process group.
signal_all() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ -n "$pid" ]] || continue
    if [[ "$1" == KILL ]]; then
      kill -s KILL -- "-$pid" 2>/dev/null || kill -s KILL "$pid" 2>/dev/null || true
    else
      kill -s "$1" "$pid" 2>/dev/null || true
    fi
  done
}

# Only this script acts on its traps: a child signalled between fork and exec
# still carries them.
# shellcheck disable=SC2329  # called from the traps
on_signal() {
  [[ "$BASHPID" == "$main_pid" ]] || exit 143
  if ((signalled)); then
    say "SIG$1 again: killing the processes"
    signal_all KILL
  else
    signalled=1
    say "SIG$1: forwarding to the $processes processes (signal again to kill them)"
    signal_all "$1"
  fi
}

# shellcheck disable=SC2329
cleanup() {
  [[ "$BASHPID" == "$main_pid" ]] || return 0
  signal_all TERM  # only copies still running, i.e. when the script itself fails
  rm -rf "$fifos"
}
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal TERM' HUP  # a closed terminal: stop cleanly, not abruptly

say "$processes processes, coordinator localhost:$port"
for ((i = 0; i < processes; i++)); do
  mkfifo "$fifos/$i"
  # Job control gives every copy (and relay) its own process group: a Ctrl-C
  # reaches only this script, which forwards it once, and SIGINT is not
  # ignored in the copies as it would be in background jobs without it.
  # The subshells drop this script's traps (bash would run the EXIT trap in a
  # child whose exec fails) and exec, so $! is the process itself.
  set -m
  (
    trap - EXIT INT TERM HUP
    relay "[$i] "
  ) <"$fifos/$i" 3>&- &
  relays+=("$!")
  (
    trap - EXIT INT TERM HUP
    exec "$@" --coordinator_address="localhost:$port" --num_processes="$processes" \
      --process_id="$i"
  ) </dev/null >"$fifos/$i" 2>&1 3>&- &
  pids+=("$!")
  set +m
done

status=0
remaining=$processes
kill_in=-1  # polls of 0.2 s left before SIGKILL, once a copy has failed
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    pid="${pids[i]}"
    # bash reaps finished children as they end; `wait` then returns the status.
    if [[ -z "$pid" ]] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    pids[i]=''
    remaining=$((remaining - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      if ((remaining > 0 && !signalled)); then
        say "process $i exited with status $rc; stopping the others"
        signal_all TERM
        kill_in=$((grace * 5))
      fi
    fi
  done
  if ((remaining > 0 && kill_in == 0)); then
    say "still running ${grace}s after SIGTERM; killing them"
    signal_all KILL
  fi
  if ((remaining > 0)); then
    kill_in=$((kill_in - 1))
    # A Ctrl-C ends the sleep too (the trap handles it); 2> hides bash's own
    # "Killed" notices, printed after a foreground command.
    { sleep 0.2 || true; } 2>/dev/null
  fi
done

# The relays end at end of input. Opening each FIFO read-write (never blocks)
# frees a relay still waiting for a copy that died before opening it; one kept
# open by an orphaned grandchild is stopped after 5 s.
for ((i = 0; i < processes; i++)); do
  { : <>"$fifos/$i"; } 2>/dev/null || true
done
for ((tick = 0; tick < 25; tick++)); do
  alive=0
  for pid in "${relays[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      alive=1
    fi
  done
  ((alive)) || break
  { sleep 0.2 || true; } 2>/dev/null
done
kill "${relays[@]}" 2>/dev/null || true
wait "${relays[@]}" 2>/dev/null || true
exit "$status"
