"""Two processes x 4 CPU devices (jax.distributed on localhost) equal one process x 8.

Also: a checkpoint written by the 2-process run restores in a 1-process run,
in this process and by resuming training, where it continues exactly as the
1-process run does from its own checkpoint.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import needs_8_devices
from ctm_jax import checkpoint as checkpoint_lib
from ctm_jax.data import pipeline
from ctm_jax import sharding
from ctm_jax import supervised
from ctm_jax import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from ctm_jax.configs import parity

OVERRIDES = {
    'training_iterations': 6,
    'save_every': 3,
    'track_every': 3,
    'log_every': 1,
    'batch_size': 16,
    'batch_size_test': 16,
    'n_test_batches': 2,
}
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _command(workdir, **overrides):
  flags = {**OVERRIDES, **overrides}
  return [
      sys.executable,
      '-m',
      'ctm_jax.main',
      f'--config={ROOT}/configs/parity.py:smoke',
      f'--workdir={workdir}',
      *(f'--config.{k}={v}' for k, v in flags.items()),
  ]


def _env(devices):
  return dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
  )


def _run(workdir, processes=1, devices=8, **overrides):
  command = _command(workdir, **overrides)
  if processes == 1:
    procs = [subprocess.Popen(command, env=_env(devices), stderr=subprocess.PIPE, text=True)]
  else:
    port = _free_port()
    procs = [
        subprocess.Popen(
            command
            + [
                f'--coordinator_address=localhost:{port}',
                f'--num_processes={processes}',
                f'--process_id={i}',
            ],
            env=_env(devices),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
  try:
    logs = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f'process {i} of {processes} failed:\n{log[-3000:]}'
  return logs


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


def _restore(workdir, step):
  """The checkpoint at `step`, restored in this (single, 8-device) process."""
  config = parity.get_config('smoke')
  config.update(OVERRIDES)
  task = validation.validate(config)
  model = task.make_model(config)
  mesh = sharding.make_mesh(config.mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=10)
  try:
    with jax.set_mesh(mesh):
      run = supervised.setup(config, model, task, mesh)
      loader = pipeline.make_train_loader(
          task.train_source(config), batch_size=config.batch_size, seed=config.seed
      )
      iterator = iter(loader)
      state = checkpointer.restore(step, run.abstract_state, iterator)
    return jax.device_get(state), iterator.get_state()
  finally:
    checkpointer.close()


def _assert_params_close(got, want):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=str(path))


@needs_8_devices
@pytest.mark.slow  # four training processes, about 100 s on 2 cores
def test_two_processes_match_one(tmp_path):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  logs = _run(multi, processes=2, devices=4)
  assert 'process 1 of 2' in logs[1]
  _run(single)

  # Process 0 alone writes the metrics; the losses match the 1-process run.
  got, want = _losses(multi), _losses(single)
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose(
      [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], atol=1e-5
  )

  # The 2-process checkpoint restores in one process, equal to the 1-process one,
  # with the data position translated to one process.
  multi_state, multi_data = _restore(multi, 6)
  single_state, single_data = _restore(single, 6)
  assert int(multi_state.step) == 6
  _assert_params_close(multi_state.params, single_state.params)
  assert multi_data == single_data == {'next_index': 6 * OVERRIDES['batch_size']}

  # Resuming the 2-process run in one process continues as the 1-process run does.
  _run(multi, training_iterations=9)
  _run(single, training_iterations=9)
  got, want = _losses(multi), _losses(single)
  np.testing.assert_allclose(
      [got[s] for s in range(7, 10)], [want[s] for s in range(7, 10)], atol=1e-5
  )
  _assert_params_close(_restore(multi, 9)[0].params, _restore(single, 9)[0].params)


@needs_8_devices
@pytest.mark.slow  # two training processes, about 40 s on 2 cores
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
  """The others learn of the stop from a step's metrics: no process waits forever in a
  collective, and all save the same step."""
  workdir = str(tmp_path / 'run')
  port = _free_port()
  command = _command(workdir, training_iterations=10_000, save_every=5_000, track_every=5_000)
  procs = [
      subprocess.Popen(
          command
          + [f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
          env=_env(4),
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  try:
    metrics = os.path.join(workdir, 'metrics.jsonl')
    deadline = time.monotonic() + TIMEOUT_S
    while not (os.path.exists(metrics) and len(_losses(workdir)) >= 3):
      assert time.monotonic() < deadline, 'the run did not start training'
      assert all(p.poll() is None for p in procs), 'a process ended early'
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    logs = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  stopped = [re.search(r'checkpointed step (\d+), exiting', log) for log in logs]
  assert all(stopped), logs
  assert 'SIGTERM: checkpointed' in logs[1]
  assert 'a stop on another process' in logs[0]
  step = int(stopped[0].group(1))
  assert int(stopped[1].group(1)) == step < 10_000
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=10)
  assert checkpointer.latest_step() == step
  checkpointer.close()


@needs_8_devices
@pytest.mark.slow  # four training processes, about 80 s on 2 cores
def test_two_processes_fall_back_past_a_damaged_step_together(tmp_path):
  """Process 0 checks the manifests and sets the damaged step aside; both resume
  from the step it names and retrain the same losses."""
  workdir = str(tmp_path / 'run')
  _run(workdir, processes=2, devices=4)
  before = _losses(workdir)
  step_dir = os.path.join(workdir, 'checkpoints', '6', 'state')
  largest = max(
      (os.path.join(root, f) for root, _, files in os.walk(step_dir) for f in files),
      key=os.path.getsize,
  )
  with open(largest, 'r+b') as f:
    f.seek(os.path.getsize(largest) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  logs = _run(workdir, processes=2, devices=4)
  assert 'Checkpoint step 6 is damaged' in logs[0], logs[0][-3000:]
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', '6'))
  after = _losses(workdir)
  np.testing.assert_allclose([after[s] for s in (4, 5, 6)], [before[s] for s in (4, 5, 6)], atol=1e-6)
