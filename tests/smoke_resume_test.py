"""The smoke config of every task variant and baseline added with issue 17
trains on the 8-device mesh, evaluates, and resumes bit-identically: a run
cut back to its middle checkpoint and resumed ends with the same state as
the uninterrupted run."""

import json
import shutil

import chex
from absl import flags
import jax
import numpy as np
import pytest

from conftest import needs_8_devices
from ctm_jax import train
from ctm_jax.configs import digits as digits_configs
from ctm_jax.configs import parity as parity_configs
from ctm_jax.configs import qamnist as qamnist_configs
from ctm_jax.configs import sort as sort_configs


def _ff_digits():
  config = digits_configs.get_config('smoke')
  config.model_type = 'ff'
  return config


CONFIGS = {
    'sort:smoke': lambda: sort_configs.get_config('smoke'),
    'qamnist:smoke': lambda: qamnist_configs.get_config('smoke'),
    'qamnist:lstm_smoke': lambda: qamnist_configs.get_config('lstm_smoke'),
    'parity:lstm_smoke': lambda: parity_configs.get_config('lstm_smoke'),
    'digits:smoke+ff': _ff_digits,
}


@pytest.mark.slow  # two short training runs on 8 devices each
@needs_8_devices
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_smoke_config_trains_evaluates_and_resumes_bit_identically_on_the_mesh(name, tmp_path):
  flags.FLAGS.mark_as_parsed()
  config = CONFIGS[name]()
  total = config.training_iterations
  config.update(save_every=total // 2, track_every=total // 2)
  config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 2, 2, 2
  if config.get('model_type') == 'ff':  # the feed-forward baseline has no neurons to shard
    config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 4, 2, 1
  workdir = tmp_path / 'run'
  uninterrupted = train.train_and_evaluate(config, str(workdir))
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [total // 2, total]
  assert all(np.isfinite(r['train/loss']) for r in records if 'train/loss' in r)
  if config.task == 'qamnist':  # its pictures: a gif per held-out question
    assert (workdir / 'plots' / f'question_{total:07d}_0.gif').exists()
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / str(total))  # back to the middle
  resumed = train.train_and_evaluate(config, str(resumed_dir))
  assert int(resumed.step) == total
  chex.assert_trees_all_equal(resumed, uninterrupted)
