"""Q&A-MNIST: the data (answers, counts, determinism), the tick schedule,
padding ticks that change nothing, the configs, reference checkpoint args,
and MNIST on tfds mock data (the smoke configs on the mesh:
smoke_resume_test.py)."""

import argparse

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_golden, state_dict
from ctm_jax import tasks
from ctm_jax.configs import qamnist as qa_configs
from ctm_jax.data import qamnist as qa_data
from ctm_jax.interop import torch as torch_interop
from ctm_jax.models import qamnist as qa_model


class NumberedImages:
  """Base images whose pixels spell their index, with label (7 i + 3) mod 10."""

  def __len__(self):
    return 500

  def get(self, index):
    return np.full((4, 4, 1), float(index), np.float32), (7 * int(index) + 3) % 10


def _source(seed=0, split='train', images=3, images_delta=2, operations=3, operations_delta=2):
  return qa_data.QAMNISTSource(
      NumberedImages(), num_images=images, num_images_delta=images_delta, num_operations=operations,
      num_operations_delta=operations_delta, seed=seed, num_records=10_000, split=split,
  )


def _brute_force_answer(record):
  """Evaluates the question as written: ((d[i0] op1 d[i1]) mod 10 op2 d[i2]) mod 10 ..."""
  labels = [(7 * int(record['digits'][s, 0, 0, 0]) + 3) % 10 for s in range(record['num_digits'])]
  tokens = record['question'][: 2 * record['num_operations'] + 1]
  expression = str(labels[tokens[0]] % 10)
  for operator, index in zip(tokens[1::2], tokens[2::2]):
    expression = f'(({expression}) {"+" if operator == -1 else "-"} {labels[index]}) % 10'
  return eval(expression)  # pylint: disable=eval-used


def test_answers_equal_a_brute_force_evaluation_of_the_question():
  source = _source()
  for index in range(300):
    record = source[index]
    assert record['targets'] == _brute_force_answer(record), index
    assert 0 <= record['targets'] < 10


def test_counts_cover_the_reference_samplers_range_and_padding_is_zero():
  source = _source()
  records = [source[i] for i in range(400)]
  # np.random.randint(n - delta, n + delta): 1 to 4 for 3 +- 2.
  assert sorted({int(r['num_digits']) for r in records}) == [1, 2, 3, 4]
  assert sorted({int(r['num_operations']) for r in records}) == [1, 2, 3, 4]
  assert qa_data.count_range(3, 0) == (3, 3)
  for r in records:
    assert r['digits'].shape == (4, 4, 4, 1) and r['question'].shape == (9,)
    assert not r['digits'][r['num_digits']:].any()
    used = 2 * r['num_operations'] + 1
    assert not r['question'][used:].any()
    assert (r['question'][1:used:2] < 0).all() and (r['question'][0:used:2] >= 0).all()
    assert (r['question'][0:used:2] < r['num_digits']).all()


def test_records_are_fixed_by_split_seed_and_index():
  a, b = _source(seed=3)[17], _source(seed=3)[17]
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  differ = lambda x, y: any(not np.array_equal(x[k], y[k]) for k in x)
  assert differ(a, _source(seed=4)[17]) and differ(a, _source(seed=3)[18])
  assert differ(a, _source(seed=3, split='eval')[17])


def test_tick_schedule_has_the_configured_phase_lengths():
  slots, tokens, per_digit, per_part, answer = 4, 9, 3, 2, 5
  phase_T, digit_T, token_T = qa_model.tick_schedule(slots, tokens, per_digit, per_part, answer)
  assert phase_T.tolist() == [0] * 12 + [1] * 18 + [2] * 5
  assert digit_T[:12].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
  assert token_T[12:30].tolist() == [t // 2 for t in range(18)]
  num_digits, num_operations = np.array([1, 4, 2]), np.array([2, 4, 1])
  active_TxB = np.asarray(qa_model.active_ticks((phase_T, digit_T, token_T), num_digits, num_operations))
  want = num_digits * per_digit + (2 * num_operations + 1) * per_part + answer
  np.testing.assert_array_equal(active_TxB.sum(0), want)
  # Each example's own ticks come first in each phase.
  assert active_TxB[:3, 0].all() and not active_TxB[3:12, 0].any()


def _model_and_batch(model_type, seed=0):
  config = qa_configs.get_config('lstm_smoke' if model_type == 'lstm' else 'smoke')
  config.q_num_repeats_per_input = 2  # padding spans whole repeats
  task = tasks.get('qamnist')
  model = task.make_model(config)
  batch = {k: jnp.asarray(v) for k, v in task.synthetic_batch(config, 4, seed).items()}
  # Padding in the digits only, in the question only, in both, in neither.
  batch['num_digits'] = jnp.array([1, 2, 1, 2], jnp.int32)
  batch['num_operations'] = jnp.array([2, 1, 1, 2], jnp.int32)
  variables = model.init(jax.random.key(seed), task.model_inputs(batch))
  return task, model, variables, batch


# The CTM compiles for ~20 s here (five shapes): slow; the LSTM runs by default.
@pytest.mark.parametrize('model_type', [pytest.param('ctm', marks=pytest.mark.slow), 'lstm'])
def test_padding_ticks_leave_each_example_as_its_own_length_would(model_type):
  """A batch of mixed lengths gives each example the answers it gets alone,
  cut to its own digits and question (no padding at all)."""
  task, model, variables, batch = _model_and_batch(model_type)
  answer = model.iterations_for_answering
  apply = jax.jit(model.apply)
  padded = apply(variables, task.model_inputs(batch))
  for b in range(4):
    n_d, n_o = int(batch['num_digits'][b]), int(batch['num_operations'][b])
    alone = {
        'digits': batch['digits'][b : b + 1, :n_d],
        'question': batch['question'][b : b + 1, : 2 * n_o + 1],
        'num_digits': batch['num_digits'][b : b + 1],
        'num_operations': batch['num_operations'][b : b + 1],
    }
    out = apply(variables, alone)
    assert out.predictions.shape[-1] == model.num_ticks(n_d, 2 * n_o + 1)
    np.testing.assert_allclose(
        padded.predictions[b, :, -answer:], out.predictions[0, :, -answer:], rtol=1e-5, atol=1e-5
    )


def test_padding_digits_stay_out_of_the_batch_statistics():
  task, model, variables, batch = _model_and_batch('ctm')
  batch['num_digits'] = jnp.full((4,), 1, jnp.int32)
  inputs = task.model_inputs(batch)
  run = jax.jit(lambda x: model.apply(variables, x, train=True, mutable=['batch_stats']))
  out, stats = run(inputs)
  # Other pixels in the unused slot change nothing; a shorter batch is the same.
  noisy = {**inputs, 'digits': inputs['digits'].at[:, 1].add(5.0)}
  out_noisy, stats_noisy = run(noisy)
  cut = {**inputs, 'digits': inputs['digits'][:, :1]}
  out_cut, stats_cut = run(cut)
  chex.assert_trees_all_equal(stats, stats_noisy)
  chex.assert_trees_all_close(stats, stats_cut, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.predictions[..., -2:], out_noisy.predictions[..., -2:], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.predictions[..., -2:], out_cut.predictions[..., -2:], rtol=1e-5, atol=1e-5)


def test_default_config_is_train_ctm_10_key_for_key():
  config = qa_configs.get_config()
  expected = dict(
      seed=2, model_type='ctm', q_num_images=3, q_num_images_delta=2, q_num_repeats_per_input=10,
      q_num_operations=3, q_num_operations_delta=2, q_num_answer_steps=10, n_test_batches=20,
      weight_decay=0.0, use_scheduler=True, scheduler_type='cosine', gamma=0.0, batch_size=64,
      batch_size_test=256, lr=1e-4, training_iterations=300_001, warmup_steps=500,
      track_every=1000, save_every=10_000, dataset='mnist',
  )
  assert {k: config[k] for k in expected} == expected
  model = dict(
      memory_length=30, d_model=1024, d_input=64, n_synch_out=32, n_synch_action=32,
      synapse_depth=1, heads=4, memory_hidden_dims=16, dropout=0.0, deep_nlms=True,
      do_layernorm_nlm=False, neuron_select_type='random',
  )
  assert {k: config.model[k] for k in model} == model
  one = qa_configs.get_config('ctm_1')
  assert (one.seed, one.model.memory_length, one.q_num_repeats_per_input, one.q_num_answer_steps) == (0, 3, 1, 1)
  built = tasks.get('qamnist').make_model(config)
  # 4 digits and 9 tokens at most (the sampler's exclusive upper end), 10 ticks each, 10 to answer.
  assert built.iterations == 140 and built.iterations_per_digit == 10
  for variant, width in (('lstm_10', 875), ('lstm_1', 741)):
    lstm = qa_configs.get_config(variant)
    assert (lstm.model_type, lstm.model.d_model, lstm.use_most_certain) == ('lstm', width, False)
    assert isinstance(tasks.get('qamnist').make_model(lstm), qa_model.LSTMQAMNIST)


def test_a_missing_mnist_names_the_preparation_and_bad_counts_are_refused():
  task = tasks.get('qamnist')
  config = qa_configs.get_config()
  config.data_dir = '/nonexistent/tfds'
  with pytest.raises(ValueError, match=r"tfds build mnist --file_format=array_record"):
    task.check_data(config)
  config = qa_configs.get_config('smoke')
  config.q_num_images_delta = 2
  with pytest.raises(ValueError, match=r'config.q_num_images_delta=2: q_num_images - q_num_images_delta'):
    task.validate(config)
  config = qa_configs.get_config('smoke')
  config.dataset = 'cifar10'
  with pytest.raises(ValueError, match=r"config.dataset='cifar10'"):
    task.validate(config)


@pytest.mark.parametrize('model_type', ['ctm', 'lstm'])
def test_reference_qamnist_args_import_with_the_scripts_model(model_type):
  case = 'qamnist' if model_type == 'ctm' else 'lstm_qamnist'
  arrays, meta = load_golden(case)
  kwargs = meta['constructor_kwargs']
  # What tasks/qamnist/train.py saves: its argparse fields and out_dims.
  args = argparse.Namespace(
      q_num_images=3, q_num_images_delta=2, q_num_repeats_per_input=1, q_num_operations=3,
      q_num_operations_delta=2, q_num_answer_steps=1, model_type=model_type,
      d_model=kwargs['d_model'], d_input=kwargs['d_input'], synapse_depth=1, heads=kwargs['heads'],
      n_synch_out=kwargs.get('n_synch_out', 8), n_synch_action=kwargs.get('n_synch_action', 8),
      neuron_select_type='random', n_random_pairing_self=0, iterations=10,
      memory_length=kwargs.get('memory_length', 3), deep_memory=True,
      memory_hidden_dims=kwargs.get('memory_hidden_dims', 4), dropout=0.0, do_normalisation=False,
      out_dims=10,
  )
  assert torch_interop.detect_task(args) == 'qamnist'
  derived = torch_interop.model_kwargs_from_args(args)
  model_class = tasks.get('qamnist').model_class_for(model_type)
  model, variables = torch_interop.import_state_dict(state_dict(arrays, meta), derived, model_class)
  digits, question = arrays['__in__x'], arrays['__in__z']
  inputs = {
      'digits': digits.transpose(0, 1, 3, 4, 2),
      'question': question.astype(np.int32),
      'num_digits': np.full(2, digits.shape[1], np.int32),
      'num_operations': np.full(2, question.shape[1] // 2, np.int32),
  }
  out = model.apply(variables, inputs)
  np.testing.assert_allclose(out.predictions, arrays['__out__predictions'], atol=1e-4)


def test_a_changed_index_table_is_refused():
  arrays, meta = load_golden('qamnist')
  sd = state_dict(arrays, meta)
  sd['index_backbone.embedding'] = sd['index_backbone.embedding'] + 0.01
  kwargs = {**meta['constructor_kwargs'], 'backbone_type': 'none', 'positional_embedding_type': 'none'}
  with pytest.raises(torch_interop.StateDictMismatch, match='index_backbone.embedding: a fixed buffer'):
    torch_interop.import_state_dict(sd, kwargs, qa_model.ContinuousThoughtMachineQAMNIST)


def _mock_mnist(num_examples=40):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def test_mnist_records_on_mock_data_are_the_references_preprocessing():
  from PIL import Image  # pylint: disable=g-import-not-at-top

  config = qa_configs.get_config('smoke')
  config.dataset = 'mnist'
  task = tasks.get('qamnist')
  with _mock_mnist():
    task.check_data(config)
    images = qa_data.MnistImages('train', '')
    raw = images._source[3]  # pylint: disable=protected-access
    image, label = images.get(3)
    record = task.train_source(config)[5]
  resized = np.asarray(Image.fromarray(np.asarray(raw['image'], np.uint8)[..., 0]).resize((32, 32), Image.BILINEAR))
  np.testing.assert_allclose(image[..., 0], (resized / 255.0 - 0.1307) / 0.3081, atol=1e-5)
  assert label == int(raw['label'])
  spec = task.record_spec(config)
  assert {k: (v.shape, v.dtype) for k, v in record.items()} == spec
