"""Wall time for a config to reach held-out accuracy thresholds (time to accuracy).

Usage (from the repo root):
  python -m benchmarks.time_to_accuracy [--config=configs/parity.py:small]
      [--metric=eval/acc_most_certain] [--thresholds=0.9,0.99] [--workdir=DIR]
      [--track_every=250] [--json=PATH] [--seed=N | --seeds=0,1,2]
      [--override=KEY=VALUE ...] [--run_to_end] [--budget=SECONDS]

Trains the config from scratch in a fresh workdir, evaluating on the held-out
set every --track_every steps, and prints a table of the first eval (step, wall
seconds since the trainer started, compile included) at which --metric (default:
accuracy at the most-certain tick; per bit for parity) reaches each threshold,
and every eval as it comes (the curve against wall time). It stops once the
last threshold is reached or the config's training_iterations are done
(--run_to_end: always train to the end, to time the whole default run;
--budget=S: stop each run after S seconds, for a target "within N minutes").
E.g. the laptop maze run: --config=configs/mazes.py:small
--metric=eval/solved_most_certain --thresholds=0.5,0.8 --track_every=500.

--seed=N passes --config.seed=N; --seeds=0,1,2 trains one seed after another
(each in DIR/seed_N) and prints one row per seed. --override=KEY=VALUE (repeated)
passes --config.KEY=VALUE, e.g. --override=lr=2e-3 --override=model.iterations=20;
an override of track_every wins over --track_every.
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
METRIC = 'eval/acc_most_certain'


def _command(config, workdir, track_every, seed, overrides):
  command = [
      sys.executable,
      '-m',
      'ctm_jax.main',
      f'--config={os.path.join(REPO, config)}',
      f'--workdir={workdir}',
  ]
  if not any(key == 'track_every' for key, _ in overrides):
    command.append(f'--config.track_every={track_every}')
  if seed is not None:
    command.append(f'--config.seed={seed}')
  command += [f'--config.{key}={value}' for key, value in overrides]
  return command


def _follow(process, metrics_path, records, metric, stop_at, deadline=None):
  """Appends the eval records of metrics.jsonl until the trainer exits (SIGTERM
  at `deadline`, a time.perf_counter() value, if it is still running then)."""
  seen = 0
  stopped = False
  while True:
    finished = process.poll() is not None
    if not finished and not stopped and deadline is not None and time.perf_counter() >= deadline:
      process.send_signal(signal.SIGTERM)  # the budget is spent: checkpoints and exits cleanly
      stopped = True
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        lines = f.readlines()
      # A line being written has no newline yet: read it next time.
      complete = len(lines) if not lines or lines[-1].endswith('\n') else len(lines) - 1
      for line in lines[seen:complete]:
        record = json.loads(line)
        if metric not in record:
          continue
        records.append(record)
        # The task's other headline numbers, where it logs them (sort has no most-certain tick).
        others = ''.join(
            f'  {name} {record[key]:.4f}'
            for key, name in (('eval/acc_most_certain', 'acc most-certain'), ('eval/acc_last', 'last tick'))
            if key in record and key != metric
        )
        print(
            f"step {record['step']:6d}  {record['eval/elapsed_s']:7.1f}s  {metric} {record[metric]:.4f}{others}",
            flush=True,
        )
        if (
            stop_at is not None
            and record[metric] >= stop_at
            and process.poll() is None
        ):
          process.send_signal(signal.SIGTERM)  # checkpoints and exits cleanly
      seen = complete
    if finished:
      break
    time.sleep(1.0)


def _run(command, workdir, metric, stop_at, budget_s=None):
  """Trains in a subprocess, following metrics.jsonl; SIGTERM once `stop_at` is reached
  (never when `stop_at` is None) or `budget_s` seconds have passed. Returns the eval
  records and the process's wall seconds."""
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  os.makedirs(workdir, exist_ok=True)
  records = []
  started = time.perf_counter()
  # The trainer's log (absl logs to stderr) stays in the workdir, for a failed run.
  with open(os.path.join(workdir, 'stderr.log'), 'w') as stderr:
    process = subprocess.Popen(command, cwd=REPO, stderr=stderr)
    try:
      _follow(process, metrics_path, records, metric, stop_at, None if budget_s is None else started + budget_s)
    except BaseException:  # Ctrl-C or SIGTERM here: the trainer checkpoints and exits too
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait()
      raise
  wall_s = time.perf_counter() - started
  if process.returncode != 0:
    print(
        f'training failed with exit code {process.returncode} (log: {workdir}/stderr.log): '
        f'{" ".join(command)}',
        file=sys.stderr,
        flush=True,
    )
  return records, wall_s, process.returncode


def _parse_seeds(text):
  try:
    return [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'--seeds wants integers separated by commas, got {text!r}')


def _parse_thresholds(text):
  try:
    values = tuple(sorted(float(s) for s in text.split(',') if s.strip()))
  except ValueError:
    values = ()
  if not values:
    raise argparse.ArgumentTypeError(f'--thresholds wants numbers separated by commas, got {text!r}')
  return values


def _parse_override(text):
  key, sep, value = text.partition('=')
  key = key.strip()
  if key.startswith('--'):
    key = key[2:]
  if key.startswith('config.'):
    key = key[len('config.') :]
  if not sep or not key:
    raise argparse.ArgumentTypeError(f'--override wants KEY=VALUE, got {text!r}')
  return key, value


def _cell(hit):
  if hit is None:
    return f"{'-':>8} {'-':>7}"
  return f"{hit['step']:>8d} {hit['eval/elapsed_s']:>7.1f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/parity.py:small', help='config[:variant]')
  parser.add_argument('--metric', default=METRIC, help='an eval metric of metrics.jsonl')
  parser.add_argument('--thresholds', type=_parse_thresholds, default=THRESHOLDS)
  parser.add_argument('--workdir', default=None, help='fresh; several seeds use DIR/seed_N')
  parser.add_argument('--track_every', type=int, default=250)
  parser.add_argument('--json', default=None)
  seeds = parser.add_mutually_exclusive_group()
  seeds.add_argument('--seed', type=int, default=None, help='--config.seed (default: the config)')
  seeds.add_argument('--seeds', type=_parse_seeds, default=None, help='e.g. 0,1,2: one run each')
  parser.add_argument(
      '--override',
      type=_parse_override,
      action='append',
      default=[],
      metavar='KEY=VALUE',
      help='passed as --config.KEY=VALUE; repeat for several',
  )
  parser.add_argument(
      '--run_to_end',
      action='store_true',
      help='train all training_iterations instead of stopping at the last threshold',
  )
  parser.add_argument(
      '--budget',
      type=float,
      default=None,
      metavar='SECONDS',
      help='stop each run after this much wall time (a target "within N minutes"), reached or not',
  )
  args = parser.parse_args(argv)
  # A SIGTERM to this script stops the trainer too (see _run), as Ctrl-C does.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  if args.seeds is not None and not args.seeds:
    parser.error('--seeds is empty')
  seed_list = args.seeds if args.seeds is not None else [args.seed]
  base = args.workdir or tempfile.mkdtemp(prefix='tta_')
  workdirs = [
      os.path.join(base, f'seed_{seed}') if args.seeds is not None else base for seed in seed_list
  ]
  for workdir in workdirs:
    if os.path.exists(os.path.join(workdir, 'checkpoints')):
      parser.error(f'--workdir {workdir} already holds a run; time-to-accuracy needs a fresh one')

  stop_at = None if args.run_to_end else max(args.thresholds)
  runs = []
  for seed, workdir in zip(seed_list, workdirs):
    command = _command(args.config, workdir, args.track_every, seed, args.override)
    print(f"# seed {'config default' if seed is None else seed}: {' '.join(command)}", flush=True)
    records, wall_s, returncode = _run(command, workdir, args.metric, stop_at, args.budget)
    hits = {t: next((r for r in records if r[args.metric] >= t), None) for t in args.thresholds}
    runs.append(
        dict(
            seed=seed,
            workdir=workdir,
            command=command,
            returncode=returncode,
            wall_s=wall_s,
            records=records,
            thresholds=hits,
        )
    )

  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  header = (
      f'# {args.config} time to {args.metric} | {device.platform} ({device.device_kind}), '
      f'{os.cpu_count()} host CPUs, {platform.machine()} | jax {jax.__version__} | '
      f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} | git {harness.git_commit()}'
  )
  print(header)
  overrides = ' '.join(f'{k}={v}' for k, v in args.override) or 'none'
  print(
      f'# overrides: {overrides} | eval every '
      f"{dict(args.override).get('track_every', args.track_every)} steps | "
      f"{'whole run' if args.run_to_end else f'stops at {max(args.thresholds):.0%}'}"
      f"{'' if args.budget is None else f' or after {args.budget:.0f} s'}"
  )
  print(
      f'{args.metric}: first eval step and wall s since the trainer started (compile '
      'included); last = last eval; run s = whole process'
  )
  titles = ''.join(f' | {t:.0%} step  wall s' for t in args.thresholds)
  print(f'seed{titles} | last step    acc |  run s')
  print('----' + '+------------------' * len(args.thresholds) + '+------------------+-------')
  for run in runs:
    seed = '-' if run['seed'] is None else str(run['seed'])
    cells = ''.join(f' | {_cell(run["thresholds"][t])}' for t in args.thresholds)
    last = run['records'][-1] if run['records'] else None
    last_cell = (
        f"{last['step']:>9d} {last[args.metric]:.4f}"
        if last
        else f"{'-':>9} {'-':>6}"
    )
    failed = '' if run['returncode'] == 0 else f'  (failed, exit {run["returncode"]})'
    print(f'{seed:>4}{cells} | {last_cell} | {run["wall_s"]:>6.0f}{failed}')
  for threshold in args.thresholds:
    missed = [str(r['seed']) for r in runs if r['thresholds'][threshold] is None]
    if missed:
      print(f'{threshold:.0%} not reached by seed(s) {", ".join(missed)}')
  if args.json:
    result = {
        'header': header,
        'config': args.config,
        'metric': args.metric,
        'overrides': dict(args.override),
        'run_to_end': args.run_to_end,
        'budget_s': args.budget,
        'runs': [
            {**run, 'thresholds': {str(t): r for t, r in run['thresholds'].items()}}
            for run in runs
        ],
    }
    if len(runs) == 1:  # the single-run layout of earlier versions
      result['records'] = runs[0]['records']
      result['thresholds'] = {str(t): r for t, r in runs[0]['thresholds'].items()}
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  if any(run['returncode'] != 0 for run in runs):
    raise SystemExit(1)


if __name__ == '__main__':
  main()
