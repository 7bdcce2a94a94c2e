#!/usr/bin/env bash
# Runs one command on every worker (host) of a Cloud TPU VM pod slice, through
# `gcloud compute tpus tpu-vm ssh --worker=all`: one process per host, which
# is what jax.distributed expects.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [OPTIONS] [--] COMMAND [ARGS...]
#
#   --tpu=NAME        the TPU VM (default $TPU_NAME)
#   --zone=ZONE       its zone (default $ZONE)
#   --project=P       its project (default: gcloud's configured project)
#   --repo_dir=DIR    the checkout on each worker, where COMMAND runs
#                     (default ~/ctm-jax)
#   --venv=DIR        a virtualenv on the workers to install into and run in
#                     (created by --setup); default: python3 with pip --user
#   --setup           first install on every worker: clone --repo_url (at --ref),
#                     or else copy this checkout (tracked files and untracked ones
#                     git does not ignore), then `pip install -e DIR[EXTRAS] 'jax[tpu]'`.
#                     Without COMMAND, only this.
#   --extras=LIST     ctm-jax extras --setup installs (default tfds: ImageNet and
#                     CIFAR read tfds-prepared data; e.g. --extras=tfds,rl)
#   --repo_url=URL    git URL for --setup (default: copy this checkout)
#   --ref=REF         branch, tag or commit of --repo_url (default: its HEAD)
#   --detach          start COMMAND and return (default: follow every worker's
#                     output until the run ends)
#   --stop            SIGTERM the run on every worker: the trainer checkpoints
#                     and exits
#   --worker=W        workers (default all; e.g. 0 or 0-1 when debugging)
#   --gcloud_flag=F   extra flag for gcloud ssh / scp (repeatable), e.g.
#                     --gcloud_flag=--internal-ip
#   --dry_run         print the gcloud commands instead of running them
#
# COMMAND runs under nohup on each worker, output in DIR/logs/<time>.log there,
# so a dropped connection does not stop it. Ctrl-C here stops the run (as
# --stop does); a second Ctrl-C only stops following it. A run still going on
# a worker blocks a new one there.
#
# A ctm_jax.main COMMAND gets --distributed=on unless it sets --distributed:
# each worker calls jax.distributed.initialize() and JAX finds its peers from
# the TPU metadata. Give it a --workdir every worker shares (a bucket mounted
# with gcsfuse on each): every worker writes checkpoints there. The same command again
# resumes from the latest checkpoint.
#
# Example, a v4-32 (4 hosts x 4 chips):
#   launch/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b --setup -- \
#     python3 -m ctm_jax.main --config=configs/imagenet.py \
#     --workdir=~/gcs/runs/imagenet --config.mesh.data=4 --config.mesh.fsdp=4
#
# With several workers gcloud needs your key in an agent first:
#   ssh-add ~/.ssh/google_compute_engine
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0" >&2
  exit 2
}
die() {
  echo "launch/tpu_pod.sh: $*" >&2
  exit 2
}
say() { echo "launch/tpu_pod.sh: $*" >&2; }

tpu="${TPU_NAME:-}"
zone="${ZONE:-}"
project=
# shellcheck disable=SC2088  # a remote path: ~ expands on the worker
repo_dir='~/ctm-jax'
venv=
extras=tfds
setup=0
repo_url=
ref=
detach=0
stop=0
worker=all
gcloud_flags=()
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo_dir=*) repo_dir="${1#*=}" ;;
    --venv=*) venv="${1#*=}" ;;
    --extras=*) extras="${1#*=}" ;;
    --setup) setup=1 ;;
    --repo_url=*) repo_url="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --detach) detach=1 ;;
    --stop) stop=1 ;;
    --worker=*) worker="${1#*=}" ;;
    --gcloud_flag=*) gcloud_flags+=("${1#*=}") ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage ;;
    --)
      shift
      break
      ;;
    -*) die "unknown option '$1' (options go before COMMAND; --help lists them)" ;;
    *) break ;;
  esac
  shift
done

[[ -n "$tpu" ]] || die "--tpu=NAME is required (or set TPU_NAME); --help for usage"
[[ -n "$zone" ]] || die "--zone=ZONE is required (or set ZONE); --help for usage"
[[ -n "$repo_dir" ]] || die "--repo_dir must not be empty"
[[ -n "$worker" ]] || die "--worker must not be empty"
if ((!setup)) && [[ -n "$repo_url$ref" ]]; then
  die "--repo_url and --ref only apply with --setup"
fi
if [[ -n "$ref" && -z "$repo_url" ]]; then
  die "--ref needs --repo_url (without it --setup copies this checkout as it is)"
fi
if ((stop)); then
  ((!setup && !detach && $# == 0)) || die "--stop takes no COMMAND, --setup or --detach"
elif (($# == 0)); then
  ((setup && !detach)) || die "no COMMAND given; --help for usage"
fi

# A path for the remote shell: a leading ~/ stays unquoted, to expand there.
# shellcheck disable=SC2088
remote_path() {
  if [[ "$1" == '~' ]]; then
    printf '~'
  elif [[ "$1" == '~/'* ]]; then
    printf '~/%q' "${1#\~/}"
  else
    printf '%q' "$1"
  fi
}
dir="$(remote_path "$repo_dir")"

gcloud_common=(--zone="$zone")
if [[ -n "$project" ]]; then
  gcloud_common+=(--project="$project")
fi
gcloud_common+=(${gcloud_flags[@]+"${gcloud_flags[@]}"})

run() {  # runs a command, or prints it with --dry_run
  if ((dry_run)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_workers() {  # on_workers SCRIPT: runs a bash script on every worker
  if ((dry_run)); then  # readable rather than exact
    printf '%q ' gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_common[@]}" --worker="$worker"
    printf -- "--command=\"bash -c <script>\"\n  script: %s\n" "$1"
    return
  fi
  gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_common[@]}" --worker="$worker" \
    --command="bash -c $(printf '%q' "$1")"
}

activate=':'
if [[ -n "$venv" ]]; then
  activate=". $(remote_path "$venv")/bin/activate"
fi

stop_script="cd $dir; pid=\$(cat logs/ctm_jax.pid 2>/dev/null) || \
{ echo \"\$(hostname): no run started here\"; exit 0; }; \
if kill -TERM \"\$pid\" 2>/dev/null; then echo \"\$(hostname): SIGTERM to pid \$pid\"; \
else echo \"\$(hostname): pid \$pid has already ended\"; fi"

if ((stop)); then
  on_workers "$stop_script"
  exit 0
fi

# --- setup -------------------------------------------------------------------
if ((setup)); then
  if [[ -n "$repo_url" ]]; then
    # Detached at origin/REF for a branch, REF itself for a tag or commit.
    fetch="if [ -d $dir/.git ]; then git -C $dir fetch --quiet --tags origin; \
else git clone --quiet $(printf '%q' "$repo_url") $dir; fi; \
r=$(printf '%q' "${ref:-HEAD}"); \
if git -C $dir rev-parse --quiet --verify \"origin/\$r^{commit}\" >/dev/null; then r=\"origin/\$r\"; fi; \
git -C $dir checkout --quiet --detach \"\$r\""
  else
    # This checkout as it is, uncommitted changes included; not .git, not
    # what git ignores (venvs, runs/, build outputs).
    git rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
      die "--setup without --repo_url copies this checkout, but $(pwd) is not a git work tree"
    tarball="$(mktemp "${TMPDIR:-/tmp}/ctm-jax-src.XXXXXX")"
    trap 'rm -f "$tarball"' EXIT
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi  # not deleted files
      done |
      tar --null -T - -czf "$tarball"
    say "copying this checkout ($(du -h "$tarball" | cut -f1)) to the workers"
    run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:ctm-jax-src.tgz" "${gcloud_common[@]}" \
      --worker="$worker"
    fetch="mkdir -p $dir && tar -xzf ~/ctm-jax-src.tgz -C $dir && rm ~/ctm-jax-src.tgz"
  fi
  pip="python3 -m pip install --quiet --user"
  make_venv=':'
  if [[ -n "$venv" ]]; then
    make_venv="[ -f $(remote_path "$venv")/bin/activate ] || python3 -m venv $(remote_path "$venv")"
    pip="python3 -m pip install --quiet"
  fi
  say "installing on the workers"
  on_workers "set -e; $fetch; $make_venv; $activate; $pip -e $dir${extras:+\"[$extras]\"} 'jax[tpu]'; \
echo \"\$(hostname): \$(python3 -c 'import jax, ctm_jax; print(\"jax\", jax.__version__, \"and ctm_jax installed\")')\""
  if (($# == 0)); then
    exit 0
  fi
fi

# --- the command -------------------------------------------------------------
cmd=("$@")
is_main=0  # -m ctm_jax.main, or a path to ctm_jax/main.py
has_distributed=0
prev=
for arg in "$@"; do
  if [[ ("$prev" == -m && "$arg" == ctm_jax.main) || "$arg" == *ctm_jax/main.py ]]; then
    is_main=1
  fi
  case "$arg" in
    --distributed | --distributed=* | --nodistributed) has_distributed=1 ;;
  esac
  prev="$arg"
done
if ((is_main && !has_distributed)); then
  cmd+=(--distributed=on)
fi

log="logs/$(date +%Y%m%d-%H%M%S).log"
# On each worker: refuse if a run is going; start COMMAND under nohup, its pid
# in logs/ctm_jax.pid and, when it ends, its status in logs/ctm_jax.status.
inner="$(printf '%q ' "${cmd[@]}")& echo \$! >logs/ctm_jax.pid; wait \$!; echo \$? >logs/ctm_jax.status"
start_script="set -e; cd $dir; $activate; mkdir -p logs; \
if [ -f logs/ctm_jax.pid ] && kill -0 \"\$(cat logs/ctm_jax.pid)\" 2>/dev/null; then \
echo \"\$(hostname): a run is going here (pid \$(cat logs/ctm_jax.pid)); stop it with --stop\" >&2; exit 1; fi; \
rm -f logs/ctm_jax.pid logs/ctm_jax.status; \
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=\${TQDM_MININTERVAL:-10}; \
nohup bash -c $(printf '%q' "$inner") >$log 2>&1 </dev/null & \
while [ ! -s logs/ctm_jax.pid ]; do sleep 0.1; done; \
echo \"\$(hostname): started pid \$(cat logs/ctm_jax.pid), output in \$PWD/$log\""
# Until COMMAND ends: its output, carriage returns (progress bars) made line
# ends, each line prefixed with the host; then its exit status.
follow_script="cd $dir; \
tail -n +1 --pid=\"\$(cat logs/ctm_jax.pid)\" -f $log | stdbuf -oL tr '\r' '\n' | \
sed -u -e '/^\$/d' -e \"s/^/[\$(hostname)] /\"; \
for _ in \$(seq 50); do [ -f logs/ctm_jax.status ] && break; sleep 0.1; done; \
exit \"\$(cat logs/ctm_jax.status 2>/dev/null || echo 1)\""

if ((detach)); then
  on_workers "$start_script"
  say "started; follow worker 0 with"
  printf '  gcloud compute tpus tpu-vm ssh %q' "$tpu" >&2
  printf ' %q' "${gcloud_common[@]}" --worker=0 --command="tail -f $dir/$log" >&2
  printf '\nand stop it (checkpoint and exit) with --stop and the same --tpu, --zone options\n' >&2
  exit 0
fi

# In the foreground: gcloud runs in its own process group (set -m), so a Ctrl-C
# reaches only this script, which then stops the run on every worker.
stopping=0  # 1: stop requested, 2: stop sent
# shellcheck disable=SC2329  # called from the trap
on_interrupt() {
  if ((stopping == 1)); then
    return  # a stop that reached only some workers would hang the rest
  elif ((stopping == 2)); then
    say "no longer following; the workers go on stopping (check with --stop)"
    kill -TERM "$follower" 2>/dev/null || true
    exit 130
  fi
  stopping=1
  say "stopping the run on every worker (SIGTERM: checkpoint and exit); Ctrl-C again to stop following"
  set -m  # gcloud in its own process group, out of a second Ctrl-C's reach
  on_workers "$stop_script" &
  set +m
  stopping=2
  wait "$!" || true
}
set -m
on_workers "$start_script; $follow_script" &
follower=$!
set +m
trap on_interrupt INT TERM
trap 'kill -TERM "$follower" 2>/dev/null; exit 129' HUP  # terminal gone: the run goes on
while true; do
  status=0
  wait "$follower" || status=$?
  if ! kill -0 "$follower" 2>/dev/null; then
    break  # ended, not interrupted by a trap
  fi
done
exit "$status"
