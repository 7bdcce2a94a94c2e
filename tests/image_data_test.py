"""Real image datasets: tfds CIFAR / ImageNet on mock data, sklearn digits, and
the augmenting pipeline; the real-data configs end to end on 8 devices.

tfds.testing.mock_data serves random records of each dataset's real shapes
(ImageNet's of random sizes), so no download is needed.

Dimension glossary: B batch, H height, W width, C channels, S crop size.
"""

import json
import os
import re

from absl import flags
import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets', reason='the tfds extra: pip install -e ".[tfds]"')

from ctm_jax.configs import cifar10
from ctm_jax.configs import cifar100
from ctm_jax.configs import digits
from ctm_jax.configs import imagenet
from ctm_jax.data import augment
from ctm_jax.data import digits as digits_data
from ctm_jax.data import images
from ctm_jax.data import pipeline
from ctm_jax.data import tfds_images
from ctm_jax import tasks
from ctm_jax import train
from ctm_jax import validation
from conftest import needs_8_devices

# grain worker processes read absl flags; tests do not parse a command line.
flags.FLAGS.mark_as_parsed()

MOCK_RECORDS = 64


def _mock(num_examples=MOCK_RECORDS):
  return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# Configs and errors.


@pytest.mark.parametrize(
    'module, variant, dataset, classes',
    [
        (cifar10, 'default', 'cifar10', 10),
        (cifar10, 'smoke', 'cifar10', 10),
        (cifar100, 'default', 'cifar100', 100),
        (cifar100, 'smoke', 'cifar100', 100),
        (imagenet, 'default', 'imagenet2012', 1000),
        (imagenet, 'smoke', 'imagenet2012', 1000),
        (digits, 'default', 'digits', 10),
        (digits, 'smoke', 'digits', 10),
    ],
)
def test_real_data_configs_validate(module, variant, dataset, classes):
  config = module.get_config(variant)
  task = validation.validate(config)
  model = task.make_model(config)
  assert task is tasks.get('image_classification')
  assert (config.dataset, config.num_classes, model.out_dims) == (dataset, classes, classes)


def test_cifar10_config_is_the_reference_script():
  config = cifar10.get_config()
  m = config.model
  assert (m.d_model, m.d_input, m.synapse_depth, m.heads, m.iterations, m.memory_length) == (
      256,
      64,
      5,
      16,
      50,
      15,
  )
  assert (m.n_synch_out, m.n_synch_action, m.neuron_select_type) == (256, 512, 'random-pairing')
  assert (m.memory_hidden_dims, m.backbone_type) == (64, 'resnet18-1')
  assert (config.batch_size, config.lr, config.warmup_steps, config.weight_decay) == (
      512,
      1e-4,
      1000,
      1e-4,
  )
  assert config.scheduler_type == 'cosine' and config.augment


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('num_classes', 100, 'cifar10 has 10 classes'),
        ('image_shape', (16, 16, 3), 'cifar10 images are (32, 32, 3)'),
        ('dataset_size', -1, 'train records to use; 0 takes the whole split'),
        ('data_dir', 3, 'must be a path'),
        ('augment', 'yes', 'must be True or False'),
    ],
)
def test_bad_real_data_key_is_named(field, value, message):
  config = cifar10.get_config('smoke')
  with config.ignore_type():
    config[field] = value
  with pytest.raises(ValueError, match=re.escape(f'config.{field}={value!r}: {message}')):
    validation.validate(config)


def test_imagenet_crop_must_be_square():
  config = imagenet.get_config('smoke')
  config.image_shape = (64, 48, 3)
  with pytest.raises(ValueError, match=re.escape('config.image_shape=(64, 48, 3)')):
    validation.validate(config)


@pytest.mark.parametrize(
    'module, how', [(cifar10, 'tfds build cifar10'), (imagenet, '--manual_dir=MANUAL_DIR')]
)
def test_unprepared_dataset_says_how_to_prepare_before_writing(module, how, tmp_path):
  config = module.get_config('smoke')
  config.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(ValueError) as error:
    tasks.get('image_classification').check_data(config)
  message = str(error.value)
  assert message.startswith(f'config.dataset={config.dataset!r}: split ')
  assert how in message and '--file_format=array_record' in message
  assert config.data_dir in message
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match='is not prepared'):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()  # nothing written


# ---------------------------------------------------------------------------
# Records and preprocessing on mock data.


def test_cifar_records_are_normalised_with_the_reference_statistics():
  config = cifar100.get_config('smoke')
  with _mock():
    train_source = images.train_source(config)
    eval_source = images.eval_source(config)
    raw = train_source[5]
    example = eval_source[5]
  assert raw['image'].shape == (32, 32, 3) and raw['image'].dtype == np.uint8
  assert example['inputs'].shape == (32, 32, 3) and example['inputs'].dtype == np.float32
  assert example['targets'].dtype == np.int32
  # Mock splits hold the same records, so eval record 5 is train record 5, normalised.
  expected = (raw['image'] / 255.0 - np.array(augment.CIFAR100_MEAN)) / augment.CIFAR100_STD
  np.testing.assert_allclose(example['inputs'], expected, atol=1e-5)


def test_train_augmentation_is_seeded_and_changes_images():
  config = cifar10.get_config('smoke')
  transform = images.train_transform(config)
  with _mock():
    raws = [images.train_source(config)[i] for i in range(16)]
  plain = [tfds_images.eval_preprocess(r, dataset='cifar10', size=32)['inputs'] for r in raws]

  def augmented(seed):
    return [transform(r, np.random.default_rng([seed, i]))['inputs'] for i, r in enumerate(raws)]

  first, again, other = augmented(0), augmented(0), augmented(1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert sum(not np.array_equal(a, p) for a, p in zip(first, plain)) >= 8
  assert any(not np.array_equal(a, b) for a, b in zip(first, other))
  config.augment = False
  for r, p in zip(raws, plain):
    np.testing.assert_array_equal(images.train_transform(config)(r, None)['inputs'], p)


def test_imagenet_crops_any_image_size_to_the_configured_crop():
  config = imagenet.get_config('smoke')  # 64x64 crops
  transform = images.train_transform(config)
  with _mock(8):
    source = images.train_source(config)
    raws = [source[i] for i in range(8)]
    evals = [images.eval_source(config)[i] for i in range(8)]
  assert len({r['image'].shape for r in raws}) > 1  # mock images vary in size
  for i, r in enumerate(raws):
    out = transform(r, np.random.default_rng(i))['inputs']
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
  for e in evals:
    assert e['inputs'].shape == (64, 64, 3)


def test_dataset_size_takes_a_prefix_of_the_split():
  config = cifar10.get_config('smoke')
  config.dataset_size = 10
  with _mock():
    assert len(images.train_source(config)) == 10
    config.dataset_size = MOCK_RECORDS + 1
    with pytest.raises(ValueError, match=re.escape(f'config.dataset_size={MOCK_RECORDS + 1}')):
      images.train_source(config)


# ---------------------------------------------------------------------------
# The augmenting pipeline.


def _loader(source, transform, batch_size=4, **kwargs):
  return pipeline.make_train_loader(
      source, batch_size=batch_size, seed=3, transform=transform, **kwargs
  )


def _noisy(record, rng):
  return {'x': record + rng.normal(), 'i': record}


def _pairs(batch) -> set:
  return set(zip(batch['i'].tolist(), batch['x'].tolist()))


def test_augmentation_does_not_depend_on_the_host_split():
  """Two hosts' batches of step s hold the records and the noise of the one-host batch."""
  source = np.arange(24, dtype=np.float64)
  whole = iter(_loader(source, _noisy, batch_size=8))
  halves = [iter(_loader(source, _noisy, shard_index=i, shard_count=2)) for i in range(2)]
  seen = []
  for _ in range(6):  # two epochs
    batch = next(whole)
    assert _pairs(batch) == _pairs(next(halves[0])) | _pairs(next(halves[1]))
    seen.append(batch)
  first, second = (np.concatenate([b['x'] for b in seen[e * 3 : e * 3 + 3]]) for e in (0, 1))
  assert not np.array_equal(np.sort(first), np.sort(second))  # fresh noise every epoch


def test_resumed_augmenting_iterator_repeats_the_same_batches():
  source = np.arange(40, dtype=np.float64)
  it = iter(_loader(source, _noisy))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)['x'] for _ in range(4)]
  resumed = iter(_loader(source, _noisy))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)['x'], want)


def test_augmentation_runs_in_worker_processes():
  """The CIFAR transform pickles into grain's workers and draws the same augmentation there."""
  rng = np.random.default_rng(0)
  source = [
      {'image': rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 'label': np.int32(i % 10)}
      for i in range(32)
  ]
  transform = images.train_transform(cifar10.get_config('smoke'))
  batches = {}
  for workers in (0, 1):  # one worker keeps the batch order
    it = iter(_loader(source, transform, worker_count=workers))
    batches[workers] = [next(it)['inputs'] for _ in range(4)]
  for in_process, in_worker in zip(batches[0], batches[1]):
    np.testing.assert_array_equal(in_process, in_worker)


# ---------------------------------------------------------------------------
# Digits.


def test_digits_split_is_fixed_stratified_and_standardised():
  train_split, test_split = digits_data.Digits('train'), digits_data.Digits('eval')
  assert (len(train_split), len(test_split)) == (1797 - 360, 360)
  counts = np.bincount(test_split.targets_N, minlength=10)
  assert counts.min() >= 35  # ~36 per class
  assert abs(train_split.inputs_NxHxWxC.mean()) < 1e-5
  assert abs(train_split.inputs_NxHxWxC.std() - 1) < 1e-4
  record = test_split[0]
  assert record['inputs'].shape == (8, 8, 1) and record['targets'].dtype == np.int32
  np.testing.assert_array_equal(digits_data.Digits('eval').targets_N, test_split.targets_N)


@pytest.mark.slow  # ~50 s on 2 cores
def test_digits_learns_offline(tmp_path):
  config = digits.get_config('smoke')
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  records = _records(tmp_path / 'run')
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  final = [r for r in records if 'eval/loss' in r][-1]
  assert losses[-1] < 0.25 * losses[0], losses
  assert final['eval/acc_most_certain'] > 0.5, final  # chance is 0.1


# ---------------------------------------------------------------------------
# End to end on 8 devices.


def _short(config, steps):
  config.training_iterations = steps
  config.save_every = steps
  config.track_every = steps
  config.log_every = steps
  config.warmup_steps = 1
  return config


@needs_8_devices
@pytest.mark.parametrize(
    'module',
    [  # ~40 s each on 2 cores; the default suite trains the synthetic image task
        pytest.param(cifar10, marks=pytest.mark.slow),
        pytest.param(cifar100, marks=pytest.mark.slow),
        pytest.param(imagenet, marks=pytest.mark.slow),
    ],
    ids=['cifar10', 'cifar100', 'imagenet'],
)
def test_smoke_trains_and_evaluates_on_8_devices(module, tmp_path):
  config = _short(module.get_config('smoke'), steps=4)
  config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 2, 2, 2
  config.n_attention_gifs = 1  # the tracked step on sharded parameters
  with _mock():
    state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 4
  final = [r for r in _records(tmp_path / 'run') if 'eval/loss' in r][-1]
  assert np.isfinite(final['eval/loss'])
  assert 0 <= final['eval/acc_most_certain'] <= 1 and 0 <= final['eval/top5_last'] <= 1
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['4']
  assert os.path.exists(tmp_path / 'run' / 'plots' / 'attention_0000004_0.gif')


def _memory_gib() -> float:
  """MemAvailable of this machine in GiB (0 where /proc/meminfo is missing)."""
  try:
    with open('/proc/meminfo') as f:
      fields = dict(line.split(':', 1) for line in f)
  except OSError:
    return 0.0
  return int(fields['MemAvailable'].split()[0]) / 2**20


# compile_check at batch 8 on fsdp 8: 4.3 GiB peak per device, x 8 simulated
# devices in one process, plus XLA's compile of a 186M-parameter step.
FULL_IMAGENET_GIB = 40


@pytest.mark.slow
@needs_8_devices
@pytest.mark.skipif(
    _memory_gib() < FULL_IMAGENET_GIB,
    reason=f'the full ImageNet config on 8 simulated devices needs ~{FULL_IMAGENET_GIB} GiB of '
    'host memory',
)
def test_full_imagenet_config_trains_on_8_devices(tmp_path):
  config = _short(imagenet.get_config(), steps=2)
  config.batch_size = config.batch_size_test = 8
  config.n_test_batches = 1
  config.num_read_threads = 0
  with _mock(16):
    state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
  records = _records(tmp_path / 'run')
  assert all(np.isfinite(r['train/loss']) for r in records if 'train/loss' in r)
