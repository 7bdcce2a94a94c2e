"""Per-example early exit on a trained model: accuracy, ticks and wall time.

Usage (from the repo root):
  python -m benchmarks.early_exit_bench --workdir=RUN [--examples=512] [--batch=1,256]
      [--thresholds=0.5,0.6,0.7,0.8,0.9,0.95,0.99] [--repeats=5] [--slots=64]

On the run's first --examples held-out records (its task's eval source), for
each certainty threshold: accuracy and mean ticks of `model.apply(...,
exit_threshold=th)` next to the post-hoc adaptive-compute table (every tick run,
each example's first tick past the threshold picked), which must agree; and
the wall time per example of the early-exit program relative to running every
tick, at each --batch size (batch 1, on the first 64 examples: each example
stops on its own; a bigger batch runs until its least certain example stops).

Serving (`--slots=S`, 0 to skip): examples per second over all --examples of
every tick in batches of S, of early exit in batches of S (each batch until
its slowest example stops), and of `ctm_jax.serving.Server` with S slots, a
finished example's slot refilled from the queue at once.
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import numpy as np

from benchmarks import harness

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def held_out(task, config, examples: int) -> dict:
  source = task.eval_source(config)
  count = min(examples, len(source))
  records = [source[i] for i in range(count)]
  return {key: np.stack([r[key] for r in records]) for key in records[0]}


def _timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def _every_tick(model, variables, batch):
  """The plain forward (a scan over every tick) over a queue, `batch` at a time."""
  from ctm_jax import serving  # pylint: disable=g-import-not-at-top

  return jax.jit(
      lambda inputs: serving.map_in_chunks(
          lambda x: model.apply(variables, x).predictions, inputs, batch
      )
  )


def measure(model, variables, task, data, thresholds, batches, repeats, slots=0):
  """Rows per threshold: early-exit vs post-hoc accuracy and ticks, time
  ratios, and served throughput with and without refill."""
  from ctm_jax import serving  # pylint: disable=g-import-not-at-top

  inputs, count = task.model_inputs(data), len(data['targets'])
  full = jax.jit(lambda x: model.apply(variables, x))
  early = jax.jit(lambda x, th: model.apply(variables, x, exit_threshold=th))
  output = full(inputs)
  correct_NxT = np.asarray(task.correct(output, data))
  certainty_NxT = np.asarray(output.certainties[:, 1])
  rows = []
  for th in thresholds:
    th32 = np.float32(th)
    sure_NxT = certainty_NxT >= th32
    tick_N = np.where(sure_NxT.any(1), sure_NxT.argmax(1), certainty_NxT.shape[1] - 1)
    exit_out = early(inputs, th32)
    row = {
        'threshold': th,
        'posthoc_acc': float(correct_NxT[np.arange(count), tick_N].mean()),
        'posthoc_ticks': float((tick_N + 1).mean()),
        'exit_acc': float(np.asarray(task.correct(exit_out.as_output(), data))[:, 0].mean()),
        'exit_ticks': float(np.asarray(exit_out.ticks).mean()),
    }
    for batch in batches:
      # Batch 1 is timed on the first 64 examples (a call each).
      n = min(count, 64) if batch == 1 else (count // batch) * batch
      chunks = [jax.tree.map(lambda a, i=i: a[i : i + batch], inputs) for i in range(0, n, batch)]
      t_full = sum(_timed(lambda c=c: full(c), repeats) for c in chunks) / n
      t_exit = sum(_timed(lambda c=c: early(c, th32), repeats) for c in chunks) / n
      row[f'ms_full_b{batch}'] = 1e3 * t_full
      row[f'ms_exit_b{batch}'] = 1e3 * t_exit
    if slots:
      server = serving.Server(model, slots=slots)
      no_refill = serving.batched(model, batch=slots)
      every_tick = _every_tick(model, variables, slots)
      served = server(variables, inputs, th32)
      if not np.array_equal(np.asarray(served.ticks), np.asarray(exit_out.ticks)):
        raise AssertionError('the server stopped examples at other ticks than exit_threshold')
      row['rounds'] = int(server.rounds)
      row['eps_all'] = count / _timed(lambda: every_tick(inputs), repeats)
      row['eps_batched'] = count / _timed(lambda: no_refill(variables, inputs, th32), repeats)
      row['eps_served'] = count / _timed(lambda: server(variables, inputs, th32), repeats)
    rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--examples', type=int, default=512)
  parser.add_argument('--batch', default='1,256')
  parser.add_argument('--thresholds', default=','.join(map(str, THRESHOLDS)))
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--slots', type=int, default=64)
  args = parser.parse_args(argv)
  from ctm_jax import inference  # pylint: disable=g-import-not-at-top
  from ctm_jax import tasks  # pylint: disable=g-import-not-at-top

  model, variables, config = inference.load(args.workdir)
  task = tasks.get(config.task)
  batches = [int(b) for b in args.batch.split(',')]
  data = held_out(task, config, args.examples)
  rows = measure(
      model, variables, task, data, [float(t) for t in args.thresholds.split(',')],
      batches, args.repeats, args.slots,
  )
  device = jax.devices()[0]
  print(
      f'# early exit | {config.task}, {model.iterations} ticks, {len(data["targets"])} held-out '
      f'examples | {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, '
      f'{platform.machine()} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} '
      f'| git {harness.git_commit()}'
  )
  header = '| threshold | post-hoc acc | early-exit acc | post-hoc ticks | early-exit ticks |'
  header += ''.join(f' time vs all ticks, batch {b} |' for b in batches)
  print(header)
  print('|---' * (5 + len(batches)) + '|')
  for r in rows:
    line = (
        f"| {r['threshold']:g} | {100 * r['posthoc_acc']:.2f}% | {100 * r['exit_acc']:.2f}% "
        f"| {r['posthoc_ticks']:.2f} | {r['exit_ticks']:.2f} |"
    )
    line += ''.join(
        f" {r[f'ms_exit_b{b}'] / r[f'ms_full_b{b}']:.2f}x ({r[f'ms_exit_b{b}']:.3f} ms) |"
        for b in batches
    )
    print(line)
  if args.slots:
    print(f'\nServed throughput, {args.slots} slots (examples/s over {len(data["targets"])} examples):\n')
    print('| threshold | mean ticks | every tick | early exit, no refill | early exit, refill | refill vs every tick |')
    print('|---|---|---|---|---|---|')
    for r in rows:
      print(
          f"| {r['threshold']:g} | {r['exit_ticks']:.2f} | {r['eps_all']:.0f} | {r['eps_batched']:.0f} "
          f"| {r['eps_served']:.0f} | {r['eps_served'] / r['eps_all']:.2f}x |"
      )


if __name__ == '__main__':
  main()
