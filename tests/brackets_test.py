"""Brackets: the generator (validity by an independent checker, balance,
lengths, determinism), the task's checks and inputs, and the smoke config
training, evaluating and resuming bit-identically on the (2, 2, 2) mesh."""

import collections
import json
import shutil

import chex
from absl import flags
import numpy as np
import pytest

from conftest import needs_8_devices
from ctm_jax import evaluators
from ctm_jax import tasks
from ctm_jax import train
from ctm_jax import validation
from ctm_jax.configs import brackets as brackets_configs
from ctm_jax.data import brackets as data


def well_nested(text: str) -> bool:
  """Not the generator's stack: strike out innermost pairs until none is left."""
  while '()' in text or '[]' in text:
    text = text.replace('()', '').replace('[]', '')
  return not text


def _records(split='train', count=4000, low=2, high=16, width=24, seed=0):
  source = data.BracketsSource(low, high, width, seed, count, split)
  return [source[i] for i in range(count)]


def test_every_target_is_what_an_independent_checker_says():
  for split in ('train', 'eval', 'long'):
    low, high = (17, 24) if split == 'long' else (2, 16)
    for r in _records(split, 3000, low, high):
      text = data.to_text(r['tokens'])
      assert well_nested(text) == bool(r['targets']), (split, text)
      assert data.is_valid(r['tokens']) == bool(r['targets'])


def test_classes_are_half_and_half_and_the_four_edits_balanced():
  records = _records(count=4000)
  assert collections.Counter(int(r['targets']) for r in records) == {0: 2000, 1: 2000}
  invalid = [r for r in records if not r['targets']]
  # Deletions and insertions (half the edits) give odd lengths; swaps and mistypes even ones.
  odd = np.mean([int(r['length']) % 2 for r in invalid])
  assert 0.45 < odd < 0.55
  assert all(int(r['length']) % 2 == 0 for r in records if r['targets'])


@pytest.mark.parametrize('edit', data.EDITS)
def test_each_edit_is_a_near_miss_of_a_valid_sequence_within_the_range(edit):
  rng = np.random.default_rng(3)
  for _ in range(300):
    tokens = data.near_miss(rng, 3, 10, edit)
    assert 3 <= len(tokens) <= 10 and not well_nested(data.to_text(tokens))
    assert len(tokens) % 2 == (1 if edit in ('delete', 'insert') else 0)
    if edit == 'mistype':  # the kinds changed, the directions kept: as many opens as closes
      text = data.to_text(tokens)
      assert text.count('(') + text.count('[') == text.count(')') + text.count(']')


def test_lengths_padding_and_one_hot():
  for split, (low, high) in (('train', (2, 16)), ('long', (17, 24))):
    for r in _records(split, 1000, low, high):
      n = int(r['length'])
      assert low <= n <= high
      assert (r['tokens'][:n] != data.PAD).all() and (r['tokens'][n:] == data.PAD).all()
      np.testing.assert_array_equal(r['inputs'].argmax(-1), r['tokens'])
      assert r['inputs'].shape == (24, data.VOCAB) and r['inputs'].sum() == 24


def test_a_record_is_a_function_of_split_seed_and_index():
  a, b = data.BracketsSource(2, 16, 24, 5, 200), data.BracketsSource(2, 16, 24, 5, 200)
  for i in (0, 1, 57, 99):
    chex.assert_trees_all_equal(a[i], b[i])
  texts = lambda source: [data.to_text(source[i]['tokens']) for i in range(200)]  # noqa: E731
  train = texts(a)
  assert train != texts(data.BracketsSource(2, 16, 24, 6, 200))
  assert train != texts(data.BracketsSource(2, 16, 24, 5, 200, 'eval'))


def test_the_valid_generator_reaches_deep_nesting_and_both_kinds():
  rng = np.random.default_rng(0)
  depths = []
  for _ in range(500):
    text = data.to_text(data.random_valid(rng, 16))
    depth = deepest = 0
    for c in text:
      depth += 1 if c in '([' else -1
      deepest = max(deepest, depth)
    depths.append(deepest)
    assert well_nested(text)
  assert min(depths) == 1 and max(depths) >= 6
  assert any('(' in t and '[' in t for t in [data.to_text(data.random_valid(rng, 8)) for _ in range(20)])


@pytest.mark.parametrize('override,named', [
    (dict(brackets_max_length=1), 'config.brackets_max_length=1'),
    (dict(brackets_min_length=10, brackets_max_length=8), 'config.brackets_max_length=8'),
    (dict(brackets_long_max_length=8), 'config.brackets_long_max_length=8'),
    (dict(brackets_min_length=0), 'config.brackets_min_length=0'),
    (dict(n_sequence_gifs=-1), 'config.n_sequence_gifs=-1'),
])
def test_bad_lengths_are_one_line_naming_the_field(override, named):
  config = brackets_configs.get_config('smoke')
  config.update(override)
  with pytest.raises(ValueError) as raised:
    validation.validate(config)
  assert str(raised.value).startswith(named) and '\n' not in str(raised.value)


def test_predict_reads_brackets_as_text():
  config = brackets_configs.get_config('smoke')
  task = tasks.get('brackets')
  batch = task.read_input(config, '( ( ) [ ] )')
  assert batch['inputs'].shape == (1, 12, data.VOCAB) and int(batch['targets'][0]) == 1
  assert int(task.read_input(config, '([)]')['targets'][0]) == 0
  with pytest.raises(ValueError, match=r"--input=\(x\): 'x' at position 1 is not a bracket"):
    task.read_input(config, '(x)')
  with pytest.raises(ValueError, match='13 brackets; the model reads 1 to 12'):
    task.read_input(config, '(' * 13)
  assert task.describe(config, np.array([0.0, 2.0])).startswith('valid (p 0.88')


def test_accuracy_per_kind_is_read_at_each_examples_most_certain_tick():
  from ctm_jax.tasks import brackets as brackets_task  # pylint: disable=g-import-not-at-top

  kinds = list(data.KINDS)
  per_example = {
      # Right only at tick 1: counted where tick 1 is the most certain.
      'correct_BxT': np.array([[0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32),
      'most_certain_B': np.array([1, 0, 0, 2]),
      'kind_B': np.array([kinds.index('valid'), kinds.index('valid'), kinds.index('swap'), kinds.index('mistype')]),
  }
  assert brackets_task.accuracy_by_kind(per_example, 'acc') == {
      'eval/acc_most_certain_valid': 0.5,
      'eval/acc_most_certain_swap': 1.0,
      'eval/acc_most_certain_mistype': 1.0,
  }
  # Records say what they are: valid, the edit drawn, or unknown for text from elsewhere.
  records = _records(count=400)
  assert {kinds[int(r['kind'])] for r in records} == {'valid', *data.EDITS}
  assert all((kinds[int(r['kind'])] == 'valid') == bool(r['targets']) for r in records)
  assert kinds[int(data.record(data.from_text('(]'), 4)['kind'])] == 'unknown'
  assert kinds[int(data.record(data.from_text('()'), 4)['kind'])] == 'valid'


@pytest.mark.parametrize('variant', ['smoke', 'lstm_smoke'])
def test_the_attention_never_reads_the_padding(variant):
  """What a padded position holds changes no output, and it gets no attention."""
  import jax  # pylint: disable=g-import-not-at-top

  config = brackets_configs.get_config(variant)
  task = tasks.get('brackets')
  model = task.make_model(config)
  batch = task.synthetic_batch(config, 8, 0)
  x_BxWxV = batch['inputs']
  padded_BxW = batch['tokens'] == data.PAD
  assert padded_BxW.any()
  variables = model.init(jax.random.key(0), x_BxWxV)
  noisy_BxWxV = x_BxWxV + padded_BxW[..., None] * np.random.default_rng(0).normal(size=x_BxWxV.shape)
  noisy_BxWxV[..., data.PAD] = np.where(padded_BxW, 1.0, 0.0)  # still padding: token 0 set
  out = model.apply(variables, x_BxWxV, track=True)
  noisy = model.apply(variables, noisy_BxWxV.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(noisy.predictions), np.asarray(out.predictions))
  attention_BxTxW = np.asarray(evaluators.head_mean_attention(out))
  assert np.all(attention_BxTxW[np.broadcast_to(padded_BxW[:, None], attention_BxTxW.shape)] == 0)
  # The same change at the tokens does change the answer: the check above can fail.
  changed = model.apply(variables, (x_BxWxV + ~padded_BxW[..., None] * 0.5).astype(np.float32))
  assert not np.array_equal(np.asarray(changed.predictions), np.asarray(out.predictions))


@pytest.mark.slow  # two short training runs on 8 devices each
@needs_8_devices
@pytest.mark.parametrize('variant', ['smoke', 'lstm_smoke'])
def test_smoke_trains_evaluates_and_resumes_bit_identically_on_the_mesh(variant, tmp_path):
  flags.FLAGS.mark_as_parsed()
  config = brackets_configs.get_config(variant)
  total = config.training_iterations
  config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 2, 2, 2
  workdir = tmp_path / 'run'
  uninterrupted = train.train_and_evaluate(config, str(workdir))
  with open(workdir / 'metrics.jsonl') as f:
    evals = [r for r in map(json.loads, f) if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [total // 2, total]
  assert all(0 <= r['eval/long_acc_most_certain'] <= 1 for r in evals)
  assert (workdir / 'plots' / f'sequence_{total:07d}_0.gif').exists()
  assert (workdir / 'plots' / f'adaptive_compute_{total:07d}.json').exists()
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / str(total))  # back to the middle
  resumed = train.train_and_evaluate(config, str(resumed_dir))
  assert int(resumed.step) == total
  chex.assert_trees_all_equal(resumed, uninterrupted)
