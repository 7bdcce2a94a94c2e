"""Transfer: a task from scratch against the same task from another task's CTM core,
for the same wall time.

Usage (from the repo root):
  python -m benchmarks.transfer [--budget=600] [--source_run=DIR] [--source_budget=420]
      [--config=configs/brackets.py:small_parity_core] [--source_config=configs/parity.py:small]
      [--track_every=250] [--workdir=DIR] [--override=KEY=VALUE ...]

Trains the source config (parity small) for --source_budget seconds unless
--source_run names a run of it already; then trains --config twice with the
trainer itself (`python -m ctm_jax.main`, one after the other, each in a fresh
workdir) for --budget seconds of wall time, compile included: from scratch,
and from the source run's core (`--config.init_from=<source run>
--config.init_from_parts=core`: synapses, NLMs, start states, synch decays
and pairs; the input side and the head fresh). Both evaluate every
--track_every steps. Prints held-out accuracy (most certain tick) against
wall time for both, the time each first reaches the scratch run's final
accuracy, and writes DIR/transfer.json and DIR/transfer.png.
"""

import argparse
import datetime
import json
import os
import platform
import tempfile

from benchmarks import compare_baselines

METRIC = 'eval/acc_most_certain'


def curve(workdir: str) -> list[tuple[float, int, float]]:
  """(wall seconds since the trainer started, step, held-out accuracy) per eval."""
  points = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if METRIC in record:
        points.append((record['eval/elapsed_s'], record['step'], record[METRIC]))
  return points


def first_reaching(points, target: float) -> float | None:
  """The wall time of the first eval at or above `target`; None if none is."""
  return next((seconds for seconds, _, acc in points if acc >= target), None)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/brackets.py:small_parity_core')
  parser.add_argument('--source_config', default='configs/parity.py:small')
  parser.add_argument('--source_run', default='', help='A run of --source_config to take the core from.')
  parser.add_argument('--source_budget', type=float, default=420.0)
  parser.add_argument('--budget', type=float, default=600.0)
  parser.add_argument('--track_every', type=int, default=250)
  parser.add_argument('--workdir', default='')
  parser.add_argument('--override', action='append', default=[])
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)

  root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='transfer_'))
  os.makedirs(root, exist_ok=True)
  source = os.path.abspath(args.source_run) if args.source_run else os.path.join(root, 'source')
  if not args.source_run:
    compare_baselines.train_for(args.source_config, [], source, args.source_budget)
  source_acc = curve(source)[-1][2] if os.path.exists(os.path.join(source, 'metrics.jsonl')) else None
  every = [f'track_every={args.track_every}', *args.override]
  runs = {
      'scratch': every,
      'transfer': [*every, f'init_from={source}', 'init_from_parts=core'],
  }
  curves = {}
  for name, overrides in runs.items():
    workdir = os.path.join(root, name)
    compare_baselines.train_for(args.config, overrides, workdir, args.budget)
    curves[name] = curve(workdir)
  final = curves['scratch'][-1][2]
  reached = {name: first_reaching(points, final) for name, points in curves.items()}
  result = {
      'config': args.config, 'source_config': args.source_config, 'source': source,
      'source_acc_most_certain': source_acc, 'budget_s': args.budget, 'overrides': args.override,
      'scratch_final_acc': final, 'seconds_to_scratch_final': reached,
      'curves': {name: [dict(seconds=s, step=st, acc=a) for s, st, a in points] for name, points in curves.items()},
  }
  with open(os.path.join(root, 'transfer.json'), 'w') as f:
    json.dump(result, f, indent=1)

  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  for name, points in curves.items():
    ax.plot([s for s, _, _ in points], [a for _, _, a in points], marker='o', ms=3,
            label='from scratch' if name == 'scratch' else f'from the core of {args.source_config}')
  ax.axhline(final, color='grey', linewidth=0.8, linestyle='--')
  ax.set_xlabel('wall seconds (compile included)')
  ax.set_ylabel('held-out accuracy, most certain tick')
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(f'{args.config}: {args.budget:.0f} s each')
  fig.tight_layout()
  fig.savefig(os.path.join(root, 'transfer.png'))

  print(f'# Transfer | {args.config} from {args.source_config} (its run: {source}, '
        f'{"" if source_acc is None else f"{100 * source_acc:.1f}% held out, "}core only) | {args.budget:.0f} s each '
        f'| {platform.machine()}, {os.cpu_count()} CPUs | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} | {root}')
  print('| run | steps | final acc | best acc | seconds to the scratch run\'s final acc |')
  print('|---|---|---|---|---|')
  for name, points in curves.items():
    seconds = reached[name]
    print(f'| {name} | {points[-1][1]} | {100 * points[-1][2]:.2f}% | {100 * max(a for _, _, a in points):.2f}% '
          f'| {"-" if seconds is None else f"{seconds:.0f}"} |')
  print('| wall time (s) | ' + ' | '.join(name for name in curves) + ' |')
  for row in zip(*curves.values()):
    print(f'| {row[0][0]:.0f} | ' + ' | '.join(f'{100 * acc:.1f}%' for _, _, acc in row) + ' |')


if __name__ == '__main__':
  main()
