"""Export size and load-and-run time against the training checkpoint.

Usage (from the repo root):
  python -m benchmarks.export_bench [--config=imagenet] [--variant=synthetic] [--workdir=DIR]
  python -m benchmarks.export_bench --workdir=RUN --no-train   # an existing run

Without --no-train it first trains one step of `configs/<config>.py[:variant]`
at batch 2 with the trainer itself (`imagenet.py:synthetic`: the ImageNet
model and optimiser on synthetic images, so the checkpoint is what the real
run writes at every save). Then it exports the newest
checkpoint (`ctm_jax.export`) and prints the training checkpoint's bytes, the
artefact's bytes, and the artefact's load (`artefact.load_program`: the
serialised program and the variables) and first / second call times at batch 1.
On a 2-core CPU the ImageNet config takes about 10 minutes and 12 GiB.
"""

import argparse
import datetime
import importlib
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import harness


def train_one_step(name: str, variant: str, workdir: str):
  from absl import flags  # pylint: disable=g-import-not-at-top

  from ctm_jax import train  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  config = importlib.import_module(f'ctm_jax.configs.{name}').get_config(variant or None)
  config.update(
      batch_size=2, batch_size_test=2, n_test_batches=1, training_iterations=1, warmup_steps=0,
      save_every=1, track_every=10**9, log_every=1, num_workers_train=0,
  )
  config.mesh.data, config.mesh.fsdp = 1, 1
  train.train_and_evaluate(config, workdir)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='imagenet')
  parser.add_argument('--variant', default='synthetic')
  parser.add_argument('--workdir', default='')
  parser.add_argument('--no-train', dest='train', action='store_false')
  args = parser.parse_args(argv)
  from ctm_jax import artefact  # pylint: disable=g-import-not-at-top
  from ctm_jax import export  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='export_bench_'))
  if args.train:
    started = time.perf_counter()
    train_one_step(args.config, args.variant, workdir)
    print(f'trained one step in {time.perf_counter() - started:.0f} s', file=sys.stderr)
  out = os.path.join(workdir, 'artefact')
  started = time.perf_counter()
  spec = export.export(workdir, out, overwrite=True)
  export_s = time.perf_counter() - started
  trained = export.checkpoint_bytes(workdir)

  started = time.perf_counter()
  program = artefact.load_program(out)
  load_s = time.perf_counter() - started
  shape = [1 if d is None else d for d in spec['inputs']['shape']]
  inputs = np.zeros(shape, spec['inputs']['dtype'])
  times = []
  for _ in range(2):
    started = time.perf_counter()
    jax.block_until_ready(program(inputs))
    times.append(time.perf_counter() - started)
  params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(program.variables))
  device = jax.devices()[0]
  label = f'{args.config}{":" + args.variant if args.variant else ""}' if args.train else workdir
  print(
      f'# export | {label}, '
      f'{params / 1e6:.1f} M parameters | {device.platform} ({device.device_kind}), '
      f'{os.cpu_count()} CPUs, {platform.machine()} | '
      f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} | git {harness.git_commit()}'
  )
  print('| training checkpoint | artefact | artefact / checkpoint | export | load | first call (b1) | next call (b1) |')
  print('|---|---|---|---|---|---|---|')
  print(
      f'| {trained / 2**20:.1f} MiB | {spec["bytes"] / 2**20:.1f} MiB | {spec["bytes"] / trained:.2f} '
      f'| {export_s:.1f} s | {load_s:.2f} s | {times[0]:.2f} s | {times[1]:.2f} s |'
  )


if __name__ == '__main__':
  main()
