"""Wall time for `configs/parity.py:small` to reach 90% and 99% per-bit test accuracy.

Usage (from the repo root):
  python benchmarks/parity_time_to_accuracy.py [--workdir=DIR] [--track_every=250] [--json=PATH]

Trains the `small` variant from scratch in a fresh workdir, evaluating on the
held-out set every --track_every steps, and prints a table of the first eval
(step, wall seconds since the trainer started, compile included) at which the
per-bit accuracy at the most-certain tick reaches each threshold. It stops
once the last threshold is reached or the variant's training_iterations are done.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESHOLDS = (0.90, 0.99)


def _run(workdir, track_every, stop_at):
  """Trains in a subprocess, following metrics.jsonl; SIGTERM once `stop_at` is reached."""
  command = [
      sys.executable,
      '-m',
      'ctm_jax.main',
      f'--config={REPO}/configs/parity.py:small',
      f'--workdir={workdir}',
      f'--config.track_every={track_every}',
  ]
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.DEVNULL)
  records, seen = [], 0
  while True:
    finished = process.poll() is not None
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        lines = f.readlines()
      for line in lines[seen:]:
        record = json.loads(line)
        if 'eval/acc_most_certain' not in record:
          continue
        records.append(record)
        print(
            f"step {record['step']:6d}  {record['eval/elapsed_s']:7.1f}s  "
            f"acc most-certain {record['eval/acc_most_certain']:.4f}  "
            f"last tick {record['eval/acc_last']:.4f}",
            flush=True,
        )
        if record['eval/acc_most_certain'] >= stop_at and process.poll() is None:
          process.send_signal(signal.SIGTERM)  # checkpoints and exits cleanly
      seen = len(lines)
    if finished:
      break
    time.sleep(1.0)
  if process.returncode != 0:
    raise SystemExit(f'training failed with exit code {process.returncode}: {" ".join(command)}')
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--track_every', type=int, default=250)
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix='parity_tta_')
  if os.path.exists(os.path.join(workdir, 'checkpoints')):
    parser.error(f'--workdir {workdir} already holds a run; time-to-accuracy needs a fresh one')

  records = _run(workdir, args.track_every, max(THRESHOLDS))
  import jax  # pylint: disable=g-import-not-at-top
  import model_bench  # pylint: disable=g-import-not-at-top  (this folder)

  device = jax.devices()[0]
  header = (
      f'# parity.py:small time to accuracy | {device.platform} ({device.device_kind}), '
      f'{os.cpu_count()} host CPUs, {platform.machine()} | jax {jax.__version__} | '
      f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} | git {model_bench.git_commit()}'
  )
  print(header)
  print('per-bit test accuracy (most-certain tick) | first eval step | wall s (compile included)')
  print('------------------------------------------+-----------------+--------------------------')
  results = {}
  for threshold in THRESHOLDS:
    hit = next((r for r in records if r['eval/acc_most_certain'] >= threshold), None)
    results[threshold] = hit
    if hit is None:
      print(f'{threshold:>41.0%} | not reached in the run ({records[-1]["step"]} steps)')
    else:
      print(f"{threshold:>41.0%} | {hit['step']:>15d} | {hit['eval/elapsed_s']:>24.1f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
          {
              'header': header,
              'records': records,
              'thresholds': {str(t): r for t, r in results.items()},
          },
          f,
          indent=2,
      )


if __name__ == '__main__':
  main()
