"""bf16 compute: logits close to float32, parameters and optimiser state float32.

Documented tolerance (README): with bf16 compute the logits differ from float32
by at most 2% of the largest float32 logit, and certainties by at most 1e-3.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax.configs import image
from ctm_jax.configs import parity
from ctm_jax import sharding
from ctm_jax import supervised
from ctm_jax import validation

LOGIT_TOL = 0.02  # of the largest |logit|
CERTAINTY_TOL = 1e-3
CONFIGS = {'parity': lambda: parity.get_config('small'), 'image': lambda: image.get_config('smoke')}
SLOW = {'image'}


def _inputs(task, config, n=8):
  source = task.train_source(config)
  return jnp.stack([jnp.asarray(source[i]['inputs']) for i in range(n)])


@pytest.mark.parametrize(
    'name',
    [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in sorted(CONFIGS)],
)
def test_bf16_logits_close_to_float32(name):
  config = CONFIGS[name]()
  task = validation.validate(config)
  model = task.make_model(config)
  x = _inputs(task, config)
  variables = model.init(jax.random.key(0), x[:1])
  want = jax.jit(model.apply)(variables, x)
  bf16 = model.clone(dtype='bfloat16')
  got = jax.jit(bf16.apply)(variables, x)
  assert got.predictions.dtype == jnp.float32  # heads are cast back for the loss
  scale = float(jnp.abs(want.predictions).max())
  err = float(jnp.abs(got.predictions - want.predictions).max())
  assert err <= LOGIT_TOL * scale, (err, scale)
  assert err > 0  # bf16 really was used
  np.testing.assert_allclose(got.certainties, want.certainties, atol=CERTAINTY_TOL)
  jaxpr = str(jax.make_jaxpr(lambda v: bf16.apply(v, x))(variables))
  assert 'bf16' in jaxpr and 'dot_general' in jaxpr


@pytest.mark.slow  # a sharded train step compiled, about 20 s on 2 cores
def test_bf16_train_state_stays_float32():
  config = image.get_config('smoke')
  config.model.dtype = 'bfloat16'
  task = validation.validate(config)
  model = task.make_model(config)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    run = supervised.setup(config, model, task, mesh)
    state = run.init()
    source = task.train_source(config)
    records = [source[i] for i in range(config.batch_size)]
    batch = jax.tree.map(lambda *xs: np.stack(xs), *records)
    state, metrics = run.train_step(state, sharding.global_batch(batch, mesh))
  assert np.isfinite(float(metrics['loss']))
  for tree in (state.params, state.opt_state):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32


def test_unknown_dtype_is_rejected():
  config = parity.get_config('smoke')
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match=r"config\.model\.dtype='float16'.*bfloat16"):
    validation.validate(config)
