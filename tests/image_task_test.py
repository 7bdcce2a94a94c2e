"""The image_classification task: synthetic source, task hooks, config, end to end.

The smoke run (~40 s on a 2-core CPU, compilation included) is shared by the
end-to-end and the learning tests.

Dimension glossary: B batch, T ticks, K classes, H height, W width, C channels.
"""

import json
import os
import pickle
import re

from absl import flags
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ctm_jax.analysis import metrics
from ctm_jax.configs import image
from ctm_jax.data import images
from ctm_jax.models import ctm as ctm_lib
from ctm_jax import tasks
from ctm_jax import train
from ctm_jax import validation

# grain worker processes read absl flags; tests do not parse a command line.
flags.FLAGS.mark_as_parsed()


def _smoke(**overrides):
  config = image.get_config('smoke')
  with config.ignore_type():  # bad values of another type, e.g. num_classes=2.0
    config.update(overrides)
  return config


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# Synthetic source.


def test_records_are_deterministic_and_typed():
  source = images.SyntheticImages(num_classes=5, image_shape=(6, 7, 3), seed=3, num_records=100)
  again = pickle.loads(pickle.dumps(source))
  for index in (0, 1, 42, 99):
    record = source[index]
    assert record['inputs'].shape == (6, 7, 3) and record['inputs'].dtype == np.float32
    assert record['targets'].shape == () and record['targets'].dtype == np.int32
    np.testing.assert_array_equal(record['inputs'], again[index]['inputs'])
    assert record['targets'] == again[index]['targets']
  assert not np.array_equal(source[0]['inputs'], source[1]['inputs'])
  other_seed = images.SyntheticImages(5, (6, 7, 3), seed=4, num_records=100)
  assert not np.array_equal(source[0]['inputs'], other_seed[0]['inputs'])
  with pytest.raises(IndexError):
    source[100]


def test_labels_cover_the_classes_in_range():
  source = images.SyntheticImages(num_classes=7, image_shape=(2, 2, 1), seed=0, num_records=700)
  labels = np.array([source[i]['targets'] for i in range(len(source))])
  counts = np.bincount(labels, minlength=7)
  assert len(counts) == 7  # no label >= num_classes
  # 100 expected per class; a multinomial count strays past +-40 with p < 1e-4.
  assert np.all(np.abs(counts - 100) < 40), counts


def test_classes_are_prototypes_plus_noise_shared_across_splits():
  shape = (8, 8, 3)
  train_split = images.SyntheticImages(4, shape, seed=0, num_records=200, split='train')
  eval_split = images.SyntheticImages(4, shape, seed=0, num_records=200, split='eval')
  prototypes_KxHxWxC = np.stack([train_split.prototype(k) for k in range(4)])
  for source in (train_split, eval_split):
    for index in range(200):
      record = source[index]
      residual_HxWxC = record['inputs'] - prototypes_KxHxWxC[record['targets']]
      # The residual is the record's noise: NOISE_SCALE * N(0, 1) per pixel.
      assert abs(residual_HxWxC.std() - images.NOISE_SCALE) < 0.15, (source.split, index)
  # Same classes, different noise: no eval record repeats a train record.
  train_rows = {train_split[i]['inputs'].tobytes() for i in range(200)}
  assert not train_rows & {eval_split[i]['inputs'].tobytes() for i in range(200)}


def test_sources_from_config():
  config = _smoke()
  train_source, eval_source = images.train_source(config), images.eval_source(config)
  assert len(train_source) == config.dataset_size
  assert len(eval_source) == images.EVAL_RECORDS
  assert train_source[0]['inputs'].shape == config.image_shape
  config.dataset = 'cifar11'
  with pytest.raises(ValueError, match=re.escape("config.dataset='cifar11'")):
    images.train_source(config)


# ---------------------------------------------------------------------------
# Task hooks and config validation.


def test_correct_is_the_top_class_per_tick():
  # B=2, K=3, T=2: example 0 is right at tick 0 only, example 1 at both ticks.
  predictions_BxKxT = jnp.array(
      [[[5.0, 0.0], [0.0, 0.0], [0.0, 9.0]], [[0.0, 0.0], [2.0, 3.0], [1.0, 1.0]]]
  )
  output = ctm_lib.CTMOutput(
      predictions=predictions_BxKxT, certainties=jnp.zeros((2, 2, 2)), synch_out=jnp.zeros((2, 1))
  )
  correct_BxT = tasks.get('image_classification').correct(output, {'targets': jnp.array([0, 1])})
  np.testing.assert_array_equal(correct_BxT, [[1.0, 0.0], [1.0, 1.0]])
  assert correct_BxT.dtype == jnp.float32


@pytest.mark.parametrize('variant', ['synthetic', 'smoke'])
def test_shipped_variants_are_valid(variant):
  config = image.get_config(variant)
  tasks.get('image_classification').validate(config)
  task = validation.validate(config)
  model = task.make_model(config)
  assert task is tasks.get('image_classification')
  assert model.out_dims == config.num_classes
  assert model.prediction_reshaper == (-1,)
  assert task.example_batch(config)['inputs'].shape == (1, *config.image_shape)


@pytest.mark.parametrize(
    'field, value',
    [
        ('dataset', 'cifar11'),
        ('num_classes', 0),
        ('num_classes', 2.0),
        ('image_shape', (16, 16)),
        ('image_shape', (16, 0, 3)),
        ('dataset_size', -1),
    ],
)
def test_bad_image_key_is_named(field, value):
  with pytest.raises(ValueError, match=re.escape(f'config.{field}={value!r}')) as error:
    tasks.get('image_classification').validate(_smoke(**{field: value}))
  if field == 'dataset':
    assert 'synthetic' in str(error.value)  # the valid names are listed


def test_unknown_dataset_stops_the_run(tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=re.escape("config.dataset='cifar11'")):
    train.train_and_evaluate(_smoke(dataset='cifar11'), str(workdir))
  assert not list(workdir.glob('checkpoints/*'))


# ---------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  config = _smoke(n_attention_gifs=2)
  workdir = tmp_path_factory.mktemp('image') / 'run'
  state = train.train_and_evaluate(config, str(workdir))
  return config, workdir, state


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_smoke_run_end_to_end(smoke_run):
  config, workdir, state = smoke_run
  total, ticks = config.training_iterations, config.model.iterations
  assert int(state.step) == total
  saves = range(config.save_every, total + 1, config.save_every)
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(step) for step in saves]
  assert json.loads((workdir / 'config.json').read_text()) == json.loads(
      config.to_json_best_effort()
  )
  records = _records(workdir)
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  eval_steps = [r['step'] for r in records if 'eval/loss' in r]
  assert train_steps == list(range(config.log_every, total + 1, config.log_every))
  assert eval_steps == list(range(config.track_every, total + 1, config.track_every))
  for record in records:
    assert all(np.isfinite(v) for v in record.values()), record
    assert all(0.0 <= v <= 1.0 for k, v in record.items() if '/acc_' in k), record
    if 'eval/loss' in record:
      assert {f'eval/acc_tick_{t}' for t in range(ticks)} <= set(record)
  # Per eval: tick plot, adaptive-compute table and plot, attention gifs.
  per_eval = ['eval_ticks_{}.png', 'adaptive_compute_{}.json', 'adaptive_compute_{}.png']
  per_eval += [f'attention_{{}}_{i}.gif' for i in range(config.n_attention_gifs)]
  assert sorted(os.listdir(workdir / 'plots')) == sorted(
      name.format(f'{step:07d}') for step in eval_steps for name in per_eval
  )


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_smoke_run_writes_the_paper_metrics_and_gifs(smoke_run):
  config, workdir, _ = smoke_run
  step, ticks = config.training_iterations, config.model.iterations
  record = [r for r in _records(workdir) if 'eval/loss' in r][-1]
  assert record['step'] == step
  want = {'eval/acc_last', 'eval/top5_last', 'eval/top5_most_certain', 'eval/ece_last'}
  for tick in range(ticks):
    want |= {f'eval/acc_tick_{tick}', f'eval/top5_tick_{tick}', f'eval/ece_tick_{tick}'}
  for th in metrics.DEFAULT_THRESHOLDS:
    want |= {f'eval/adaptive_acc_{th:g}', f'eval/adaptive_ticks_{th:g}'}
  assert want <= set(record)
  assert record['eval/top5_last'] == 1.0  # 4 classes: the label is always in the top 5
  plot_dir = workdir / 'plots'
  adaptive = json.loads((plot_dir / f'adaptive_compute_{step:07d}.json').read_text())
  assert adaptive['step'] == step and adaptive['ticks'] == ticks
  assert adaptive['examples'] == config.batch_size_test * config.n_test_batches
  assert adaptive['accuracy'] == [
      record[f'eval/adaptive_acc_{th:g}'] for th in adaptive['thresholds']
  ]
  png = (plot_dir / f'adaptive_compute_{step:07d}.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n'
  gifs = sorted(p.name for p in plot_dir.glob(f'attention_{step:07d}_*.gif'))
  assert gifs == [f'attention_{step:07d}_{i}.gif' for i in range(config.n_attention_gifs)]
  for name in gifs:
    with Image.open(plot_dir / name) as gif:
      assert gif.n_frames == ticks


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_smoke_run_learns(smoke_run):
  config, workdir, _ = smoke_run
  records = _records(workdir)
  train_loss = [r['train/loss'] for r in records if 'train/loss' in r]
  # Chance is ln(4) = 1.386. Seeds 0-3 on CPU: the first window (10 steps)
  # 1.375-1.392, the last 0.20-0.80; the last eval's accuracy 0.75-1.0.
  assert train_loss[-1] < train_loss[0] - 0.3, train_loss
  final_eval = [r for r in records if 'eval/loss' in r][-1]
  assert final_eval['eval/acc_most_certain'] >= 0.5, final_eval
  assert final_eval['eval/loss'] < np.log(config.num_classes) - 0.3, final_eval


# ---------------------------------------------------------------------------
# The trainer's compiled steps on CPU.


def _ynn_convolutions(hlo_text) -> int:
  """Convolutions that XLA:CPU handed to YNNPACK (each its own fusion)."""
  return len(re.findall(r'ROOT %\S+ = \S+ convolution\(', hlo_text))


def test_the_cpu_steps_leave_convolutions_to_xla(monkeypatch):
  """On CPU the train and eval steps, and the serving and prediction
  programs, run their convolutions in XLA's own kernels, not YNNPACK's
  (faster on the maze step and a model's eval forward, docs/performance.md),
  with the loss and gradient of XLA's default, and a choice the user made in
  XLA_FLAGS is kept."""
  import jax

  from ctm_jax import compiling
  from ctm_jax import serving
  from ctm_jax import sharding
  from ctm_jax import steps
  from ctm_jax import supervised

  config = _smoke()
  task = validation.validate(config, num_devices=1)
  model = task.make_model(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh):
    run = supervised.setup(config, model, task, mesh)
    state = run.abstract_state
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), task.example_batch(config))
    # XLA's default (YNNPACK convolutions), for this check's own sake.
    default = {
        compiling.YNN_FUSION_OPTION: compiling.YNN_FUSIONS_WITHOUT_CONVOLUTIONS
        + ',LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
    }
    compiled = {}
    for name, step in (('train', run.train_step), ('eval', run.eval_step)):
      lowered = step.lower(state, batch)
      compiled[name] = (lowered.compile(), lowered.compile(compiler_options=default))
      ours, xla_default = (c.as_text() for c in compiled[name])
      assert ' convolution(' in ours and _ynn_convolutions(ours) == 0
      assert _ynn_convolutions(xla_default) > 0
    # One train step each from the same state and batch (the step donates it).
    batch = jax.device_put(task.example_batch(config), run.batch_sharding)
    ours, xla_default = (step(run.init(), batch)[1] for step in compiled['train'])
    np.testing.assert_allclose(ours['loss'], xla_default['loss'], rtol=1e-5)
    np.testing.assert_allclose(ours['grad_norm'], xla_default['grad_norm'], rtol=1e-4)
    assert float(ours['grad_norm']) > 0
    fresh = run.init()
    variables = steps.variables(fresh, fresh.params)
    inputs = np.asarray(task.example_batch(config)['inputs'])[:2]
    slots = serving.Slots(model, variables, slots=2)
    admit_args = (np.arange(2, dtype=np.int32), np.full(2, 0.9, np.float32), np.full(2, 2, np.int32))
    programs = {
        'serve': serving.Server(model, slots=2)._serve.lower(variables, inputs, np.float32(0.9)),
        'admit': slots._admit.lower(variables, slots.empty(inputs), inputs, *admit_args),
        'compiling.jit (predict, evaluators, gifs)': compiling.jit(model.apply).lower(variables, inputs),
    }
    for name, lowered in programs.items():
      text = lowered.compile().as_text()
      assert ' convolution(' in text and _ynn_convolutions(text) == 0, name
  try:
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution')
    compiling.compiler_options.cache_clear()
    assert compiling.compiler_options() == {}
  finally:
    compiling.compiler_options.cache_clear()
