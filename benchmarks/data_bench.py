"""Host-side data throughput per core against what each config's step consumes.

Usage (from the repo root):
  python -m benchmarks.data_bench [--seconds=5]
      [--configs=mazes.py:small,mazes.py:reference_small,mazes.py:default]

For each config (`<file>.py:<variant>` of configs/), builds train records
exactly as the trainer does (the task's `train_source` and `train_transform`:
for mazes, generate, render, read the route, whiten, scale, augment) in this
one process for --seconds, and prints records/s on one core and the train
steps/s that one core feeds at the config's batch size. Compare with the step
rates in the README and benchmarks/model_bench.py's table; `num_workers_train`
multiplies the feed.
"""

import argparse
import datetime
import os
import platform
import time

import numpy as np

from benchmarks import harness
from benchmarks import model_bench

DEFAULT_CONFIGS = 'mazes.py:small,mazes.py:reference_small,mazes.py:default'


def throughput(config, seconds: float) -> float:
  """Train records per second built by one core, as the trainer builds them."""
  from ctm_jax import tasks  # pylint: disable=g-import-not-at-top

  task = tasks.get(config.task)
  source = task.train_source(config)
  transform = task.train_transform(config)
  rng = np.random.default_rng(0)
  count, started = 0, time.perf_counter()
  while time.perf_counter() - started < seconds:
    record = source[count % len(source)]
    if transform is not None:
      record = transform(record, rng)
    count += 1
  return count / (time.perf_counter() - started)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seconds', type=float, default=5.0)
  parser.add_argument('--configs', default=DEFAULT_CONFIGS)
  args = parser.parse_args(argv)
  print(
      f'# data per core | {platform.machine()}, {os.cpu_count()} CPUs '
      f'| {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} | git {harness.git_commit()}'
  )
  print('config                     | batch | records/s (1 core) | steps/s fed (1 core)')
  print('---------------------------+-------+--------------------+---------------------')
  for source in args.configs.split(','):
    config = model_bench.task_config(source, batch=None)
    rate = throughput(config, args.seconds)
    print(
        f'{source:<26} | {config.batch_size:>5} | {rate:>18.0f} | '
        f'{rate / config.batch_size:>20.1f}'
    )


if __name__ == '__main__':
  main()
