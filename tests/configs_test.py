"""The shared model configs build valid models of the documented sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as model_configs
from ctm_jax import ContinuousThoughtMachine


@pytest.mark.parametrize('variant', sorted(model_configs.VARIANTS))
def test_model_config_builds(variant):
  config = model_configs.get_config(variant)
  model = ContinuousThoughtMachine(**config.model)
  shape = tuple(config.input_shape)
  if variant == 'imagenet':
    shape = (32, 32, 3)  # parameter shapes do not depend on the image size
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))
  assert n_params > 0
  assert model.synch_size_out == (
      config.model.n_synch_out
      if config.model.neuron_select_type == 'random-pairing'
      else config.model.n_synch_out * (config.model.n_synch_out + 1) // 2
  )


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match='parityy'):
    model_configs.get_config('parityy')
