"""Every shipped config file and variant validates and builds its task's model."""

import importlib
import pathlib

import jax
import numpy as np
import pytest

from ctm_jax import tasks
from ctm_jax import validation

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
LIBRARIES = {'__init__', 'common', 'models'}
CONFIG_FILES = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem not in LIBRARIES)
CASES = [
    (name, variant)
    for name in CONFIG_FILES
    for variant in importlib.import_module(f'ctm_jax.configs.{name}').VARIANTS
]


def test_every_task_has_a_config():
  assert CONFIG_FILES and {'parity', 'image', 'mazes'} <= set(CONFIG_FILES)
  shipped = {
      importlib.import_module(f'ctm_jax.configs.{name}').get_config().task for name in CONFIG_FILES
  }
  # Tasks defined in ctm_jax/tasks/ (tests register fakes of their own).
  builtin = {n for n in tasks.names() if type(tasks.get(n)).__module__.startswith('ctm_jax.tasks.')}
  assert shipped == builtin


@pytest.mark.parametrize('name, variant', CASES)
def test_config_builds_its_model(name, variant):
  config = importlib.import_module(f'ctm_jax.configs.{name}').get_config(variant)
  task, model = validation.validate(config, num_devices=8)
  assert isinstance(model, task.model_class)
  if name == 'imagenet':  # parameter shapes do not depend on the image size
    config.image_shape = (32, 32, 3)
  example = task.model_inputs(task.example_batch(config))
  variables = jax.eval_shape(model.init, jax.random.key(0), example)
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params'])) > 0


def test_unknown_variant_names_the_known_ones():
  parity = importlib.import_module('ctm_jax.configs.parity')
  with pytest.raises(ValueError, match="'smal' is unknown; expected one of 'default', 'small', 'smoke'"):
    parity.get_config('smal')


def test_config_files_import_without_path_tricks():
  for name in [*CONFIG_FILES, 'common', 'models']:
    assert 'sys.path' not in (CONFIG_DIR / f'{name}.py').read_text(), name
