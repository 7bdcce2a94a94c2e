"""Sorting: the data, the reference's greedy CTC decoding and scores, the
reference checkpoint's args, and the smoke config end to end."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from conftest import load_golden, needs_8_devices, state_dict
from ctm_jax import tasks
from ctm_jax import train
from ctm_jax.configs import sort as sort_configs
from ctm_jax.data import sort as sort_data
from ctm_jax.interop import torch as torch_interop
from ctm_jax.tasks import sort as sort_task


def _reference_decode(logits_CxT, blank):
  """tasks/sort/utils.py's decode_predictions for one example, in Python."""
  decoded, previous = [], -1
  for symbol in np.argmax(logits_CxT, axis=0):
    if symbol != blank and symbol != previous:
      decoded.append(int(symbol))
      previous = symbol
  return decoded


def _random_logits(rng, batch, size, ticks):
  """Logits whose best paths hold blanks, repeats and too many or too few symbols."""
  logits = rng.standard_normal((batch, size + 1, ticks)).astype(np.float32)
  logits[:, -1] += rng.uniform(-1, 2.5, (batch, 1))  # more or fewer blanks per example
  return logits


def test_greedy_decoding_and_scores_equal_the_reference_loops():
  rng = np.random.default_rng(0)
  size, ticks = 5, 12
  logits = _random_logits(rng, 64, size, ticks)
  targets = np.stack([rng.permutation(size) for _ in range(64)]).astype(np.int32)
  # Some examples decode to exactly their target.
  for b in range(8):
    logits[b] = -5.0
    logits[b, -1] = 5.0
    for i, symbol in enumerate(targets[b]):
      logits[b, symbol, 2 * i] = 10.0
  decoded, emitted_at, count = jax.device_get(sort_task.greedy_decode(jnp.asarray(logits), size))
  correct_BxT, exact_B = jax.device_get(sort_task.sort_scores(jnp.asarray(logits), targets))
  for b in range(len(logits)):
    want = _reference_decode(logits[b], size)
    assert count[b] == len(want)
    padded = (want + [size] * size)[:size]  # the train script's truncate-and-pad
    np.testing.assert_array_equal(decoded[b], padded)
    assert exact_B[b] == float(want == targets[b].tolist())  # compute_ctc_accuracy: equal lengths too
    for t in range(ticks):  # by tick t: the prefix's decoding, position by position
      prefix = (_reference_decode(logits[b, :, : t + 1], size) + [size] * size)[:size]
      assert correct_BxT[b, t] == pytest.approx(np.mean(np.array(prefix) == targets[b]))
    assert all(emitted_at[b, i] < ticks for i in range(min(len(want), size)))
  assert exact_B[:8].all() and 0 < exact_B.mean() < 1


def test_records_are_sorting_permutations_fixed_by_seed_and_index():
  source = sort_data.train_source(7, seed=3)
  record = source[12]
  np.testing.assert_array_equal(np.sort(record['inputs']), record['inputs'][record['targets']])
  np.testing.assert_array_equal(source[12]['inputs'], sort_data.train_source(7, seed=3)[12]['inputs'])
  assert not np.array_equal(source[12]['inputs'], sort_data.eval_source(7, seed=3)[12]['inputs'])
  assert not np.array_equal(source[12]['inputs'], source[13]['inputs'])


def test_reference_sort_args_import_with_the_scripts_model():
  arrays, meta = load_golden('sort')
  kwargs = meta['constructor_kwargs']
  size = kwargs['out_dims'] - 1
  # What tasks/sort/train.py saves: its argparse fields (no backbone_type) and
  # out_dims; d_input is its default, not the model's (it builds with N).
  args = argparse.Namespace(
      d_model=kwargs['d_model'], d_input=128, synapse_depth=kwargs['synapse_depth'], heads=4,
      n_synch_out=kwargs['n_synch_out'], n_synch_action=32,
      neuron_select_type=kwargs['neuron_select_type'], n_random_pairing_self=0,
      iterations=kwargs['iterations'], memory_length=kwargs['memory_length'], deep_memory=True,
      memory_hidden_dims=kwargs['memory_hidden_dims'], dropout=0.0, dropout_nlm=None,
      do_normalisation=False, positional_embedding_type='none', N_to_sort=size,
      out_dims=size + 1,
  )
  assert torch_interop.detect_task(args) == 'sort'
  derived = torch_interop.model_kwargs_from_args(args)
  model, variables = torch_interop.import_state_dict(
      state_dict(arrays, meta), derived, tasks.get('sort').model_class
  )
  assert model.d_input == size and model.heads == 0 and model.backbone_type == 'none'
  out = model.apply(variables, arrays['__in__x'])
  np.testing.assert_allclose(out.predictions, arrays['__out__predictions'], atol=1e-4)


def test_read_input_takes_numbers_and_names_a_wrong_count():
  config = sort_configs.get_config('smoke')
  task = tasks.get('sort')
  batch = task.read_input(config, '0.5, -1, 2 3 0.1 -7')
  np.testing.assert_array_equal(batch['targets'][0], [5, 1, 4, 0, 2, 3])
  with pytest.raises(ValueError, match='--input=1 2 3'):
    task.read_input(config, '1 2 3')
  with pytest.raises(ValueError, match='numbers separated'):
    task.read_input(config, 'a b c d e f')


@pytest.mark.slow  # a short training run on 8 devices
@needs_8_devices
def test_smoke_config_trains_on_the_mesh_and_the_loss_falls(tmp_path):
  flags.FLAGS.mark_as_parsed()
  config = sort_configs.get_config('smoke')
  config.update(training_iterations=200, track_every=100, save_every=100, lr=3e-3, warmup_steps=20)
  config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 2, 2, 2
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  evals = [r for r in records if 'eval/acc_position' in r]
  assert losses[-1] < 0.8 * losses[0], losses
  assert len(evals) == 2 and 'eval/acc_sequence' in evals[-1]
  assert evals[-1]['eval/acc_position'] > evals[0]['eval/acc_position'] or evals[-1]['eval/loss'] < evals[0]['eval/loss']
  assert (tmp_path / 'run' / 'plots' / 'eval_ticks_0000200.png').exists()
