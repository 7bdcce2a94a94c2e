"""The CTM against its LSTM baseline: matched parameters, the same wall-clock budget.

Usage (from the repo root):
  python -m benchmarks.compare_baselines [--config=configs/parity.py:small]
      [--budget=300] [--workdir=DIR] [--override=KEY=VALUE ...]

Builds the config's CTM and an LSTM baseline (`--config.model_type=lstm`, its
`model.num_layers`) whose hidden width is chosen so that its parameter count
is the closest to the CTM's (both counts are printed). Trains each with the
trainer itself (`python -m ctm_jax.main`, one after the other, from a fresh
workdir) for --budget seconds of wall time, compile included, then stops it
as a user would (SIGTERM: it checkpoints and leaves), evaluates the last
checkpoint on the held-out set (`ctm_jax.evaluate`) and prints accuracy at
every tick, at the most certain tick and at the last, for both models, as the
paper's figures compare them. Writes DIR/compare.json and DIR/compare.png.
"""

import argparse
import ast
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string, as on the command line


def _load_config(spec: str, overrides):
  """configs/<name>.py[:variant] with KEY=VALUE overrides, as ctm_jax.main builds it."""
  path, _, variant = spec.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  config = importlib.import_module(f'ctm_jax.configs.{name}').get_config(variant or None)
  for override in overrides:
    key, value = override.split('=', 1)
    *parents, leaf = key.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = _value(value)
  return config


def parameters(config) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ctm_jax import tasks  # pylint: disable=g-import-not-at-top

  task = tasks.get(config.task)
  model = task.make_model(config)
  example = task.model_inputs(task.example_batch(config))
  shapes = jax.eval_shape(model.init, jax.random.key(0), example)['params']
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(shapes)))


def matched_width(config, target: int) -> tuple[int, int]:
  """(d_model, parameters) of the LSTM baseline closest to `target` parameters."""
  lstm = config.copy_and_resolve_references()
  lstm.model_type = 'lstm'
  best = None
  low, high = 4, 8192
  while low <= high:  # parameters grow with the width: bisect
    width = (low + high) // 2
    lstm.model.d_model = width
    count = parameters(lstm)
    if best is None or abs(count - target) < abs(best[1] - target):
      best = (width, count)
    if count < target:
      low = width + 1
    else:
      high = width - 1
  return best


def train_for(config_spec, overrides, workdir, budget):
  """Runs the trainer for `budget` seconds of wall time, then SIGTERM; returns the seconds it ran."""
  cmd = [sys.executable, '-m', 'ctm_jax.main', f'--config={os.path.join(REPO, config_spec)}',
         f'--workdir={workdir}', *[f'--config.{o}' for o in overrides]]
  started = time.perf_counter()
  with open(os.path.join(workdir + '.log'), 'w') as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
      proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)  # checkpoints at the next step and leaves
      proc.wait(timeout=600)
  if proc.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
    raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}); see {workdir}.log')
  return time.perf_counter() - started


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/parity.py:small')
  parser.add_argument('--budget', type=float, default=300.0)
  parser.add_argument('--workdir', default='')
  parser.add_argument('--override', action='append', default=[])
  args = parser.parse_args(argv)
  from ctm_jax import evaluate  # pylint: disable=g-import-not-at-top

  root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='compare_'))
  os.makedirs(root, exist_ok=True)
  config = _load_config(args.config, args.override)
  ctm_params = parameters(config)
  width, lstm_params = matched_width(config, ctm_params)
  runs = {
      'ctm': list(args.override),
      'lstm': [*args.override, 'model_type=lstm', f'model.d_model={width}'],
  }
  results = {}
  for name, overrides in runs.items():
    workdir = os.path.join(root, name)
    seconds = train_for(args.config, overrides, workdir, args.budget)
    scalars = evaluate.evaluate(workdir, out=os.path.join(root, f'{name}_eval'))
    ticks = sorted(int(k.rsplit('_', 1)[1]) for k in scalars if k.startswith('eval/acc_tick_'))
    results[name] = {
        'parameters': ctm_params if name == 'ctm' else lstm_params,
        'step': scalars['step'],
        'seconds': seconds,
        'acc_tick': [scalars[f'eval/acc_tick_{t}'] for t in ticks],
        'acc_most_certain': scalars['eval/acc_most_certain'],
        'acc_last': scalars['eval/acc_last'],
    }
  with open(os.path.join(root, 'compare.json'), 'w') as f:
    json.dump({'config': args.config, 'overrides': args.override, 'budget_s': args.budget, **results}, f, indent=1)
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  for name, r in results.items():
    ax.plot(range(1, len(r['acc_tick']) + 1), r['acc_tick'], marker='o', ms=3,
            label=f'{name.upper()} ({r["parameters"] / 1e3:.0f}k parameters, step {r["step"]})')
  ax.set_xlabel('internal tick')
  ax.set_ylabel('held-out accuracy')
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(f'{args.config}, {args.budget:.0f} s of training each')
  fig.tight_layout()
  fig.savefig(os.path.join(root, 'compare.png'))
  print(
      f'# CTM vs LSTM | {args.config} {" ".join(args.override)} | {args.budget:.0f} s each | '
      f'{platform.machine()}, {os.cpu_count()} CPUs | '
      f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} | {root}'
  )
  print('| model | parameters | steps in budget | acc most certain | acc last tick | acc by tick (1, T/4, T/2, 3T/4, T) |')
  print('|---|---|---|---|---|---|')
  for name, r in results.items():
    acc = r['acc_tick']
    picks = [acc[max(0, round(len(acc) * q) - 1)] for q in (1 / len(acc), 0.25, 0.5, 0.75, 1.0)]
    print(f'| {name.upper()} | {r["parameters"]:,} | {r["step"]} | {100 * r["acc_most_certain"]:.2f}% '
          f'| {100 * r["acc_last"]:.2f}% | {" / ".join(f"{100 * a:.1f}%" for a in picks)} |')


if __name__ == '__main__':
  main()
