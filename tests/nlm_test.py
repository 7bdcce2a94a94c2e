"""The NLM's matmul (nlm.private_matmul) and its hoisted weights against plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax.models import nlm
from ctm_test import _model
from deferred_test import CONFIGS
from deferred_test import assert_as_close_to_float32
from deferred_test import _assert_equal_gradients
from deferred_test import _grads
from deferred_test import _inputs
from deferred_test import _slow_unless


def _autodiff_matmul(w_DxIxO, x_DxIxB, w_DxOxI):
  del w_DxOxI  # plain autodiff differentiates through the one weight
  return jnp.einsum('dio,dib->dob', w_DxIxO, x_DxIxB)


@pytest.mark.parametrize('d, i, o, b', [(5, 7, 6, 3), (4, 25, 32, 16), (3, 16, 2, 1)])
def test_private_matmul_equals_autodiff(d, i, o, b):
  keys = jax.random.split(jax.random.key(0), 3)
  w_DxIxO = jax.random.normal(keys[0], (d, i, o))
  x_DxIxB = jax.random.normal(keys[1], (d, i, b))
  dy_DxOxB = jax.random.normal(keys[2], (d, o, b))

  def ours(w, x):
    return nlm.private_matmul(w, x, jnp.swapaxes(w, 1, 2))

  y, pullback = jax.vjp(jax.jit(ours), w_DxIxO, x_DxIxB)
  y_ref, pullback_ref = jax.vjp(lambda w, x: _autodiff_matmul(w, x, None), w_DxIxO, x_DxIxB)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(pullback(dy_DxOxB), pullback_ref(dy_DxOxB)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_hoisted_forms_replace_only_the_superlinear_params():
  model = _model(do_layernorm_nlm=True)
  params = model.init(jax.random.key(0), _inputs())['params']['tick']
  hoisted = nlm.hoist(params, jnp.float32)
  layer, layer_hoisted = params['trace_processor_0_0'], hoisted['trace_processor_0_0']
  assert set(layer_hoisted) == set(nlm.HOISTED_NAMES) | {'layernorm'}
  w_DxOxI = nlm.SuperLinear.effective_weight(layer, jnp.float32)
  np.testing.assert_allclose(layer_hoisted[nlm.HOISTED + 'w_DxOxI'], w_DxOxI, rtol=1e-6)
  np.testing.assert_allclose(
      layer_hoisted[nlm.HOISTED + 'w_DxIxO'], jnp.swapaxes(w_DxOxI, 1, 2), rtol=1e-6
  )
  # Everything that is not a SuperLinear's weight is passed through as is.
  kept = jax.tree.map(lambda a, b: a is b, hoisted['synapses_1'], params['synapses_1'])
  assert all(jax.tree.leaves(kept))


_CASE = _slow_unless(('mlp_synapse', 'none', 'float32'))


@pytest.mark.parametrize(
    'name, remat, dtype',
    [
        _CASE(n, r, dt)
        for n in sorted(CONFIGS)
        for r in ('none', 'full', 'dots', 'sqrt')
        for dt in ('float32', 'bfloat16')
    ],
)
def test_gradients_equal_plain_autodiff(monkeypatch, name, remat, dtype):
  """The tick loop's loss and every parameter gradient, hoisted weights and the
  custom VJP against the NLMs as plain einsums (float32: the golden test's
  1e-4 relative per leaf; bf16: as close to the float32 gradient)."""
  x = _inputs()
  model = _model(remat=remat, dtype=dtype, **CONFIGS[name])
  variables = model.init(jax.random.key(0), x)
  loss, grads = _grads(model, variables, x, train=True)
  with monkeypatch.context() as patch:
    patch.setattr(nlm, 'private_matmul', _autodiff_matmul)
    patch.setattr(nlm, 'hoist', lambda params, dtype: params)
    loss_ref, grads_ref = _grads(model, variables, x, train=True)
  assert jax.tree.structure(grads) == jax.tree.structure(grads_ref)
  if dtype == 'float32':
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6)
    _assert_equal_gradients(grads, grads_ref)
    return
  # bf16 rounds differently per path: each held to the float32 gradient, ours
  # no further from it than plain autodiff's (or 2% of the leaf).
  _, exact = _grads(model.clone(dtype='float32'), variables, x, train=True)
  assert_as_close_to_float32(exact, grads_ref, grads)
