"""Deferred weight gradients (models/deferred.py) against autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax.models import ctm
from ctm_jax.models import deferred
from ctm_jax.models import nlm
from ctm_test import _model
from ctm_test import _parity_input

# Random small configurations: each model option the tick's matmuls depend on.
CONFIGS = {
    'mlp_synapse': {},
    'unet_synapse': dict(synapse_depth=3, neuron_select_type='random-pairing'),
    'shallow_nlm': dict(deep_nlms=False),
    'nlm_layernorm': dict(do_layernorm_nlm=True, neuron_select_type='first-last'),
}


def _inputs():
  return _parity_input(length=16)


def _grads(model, variables, x, train=False):
  def loss(params):
    out = model.apply(
        {**variables, 'params': params}, x, train=train, rngs={'dropout': jax.random.key(7)}
    )
    # Every output: per-tick predictions and certainties, the final synch.
    return (
        jnp.sum(out.predictions**2) + jnp.sum(out.certainties[:, 0] ** 2) + jnp.sum(out.synch_out)
    )

  return jax.jit(jax.value_and_grad(loss))(variables['params'])


# Zero in exact arithmetic (softmax ignores a shift shared by all tokens):
# both sides hold rounding noise only.
_ZERO_GRADIENTS = ("['attention_k']['bias']",)


def _relative_errors(ours, reference):
  """Per leaf |ours - reference| / |reference| (2-norms; the denominator
  floored at 1e-6 of the largest leaf's norm)."""
  floor = 1e-6 * max(float(jnp.linalg.norm(g)) for g in jax.tree.leaves(reference))
  errors = {
      jax.tree_util.keystr(path): float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + floor))
      for (path, a), b in zip(
          jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(reference)
      )
  }
  return {k: v for k, v in errors.items() if k not in _ZERO_GRADIENTS}


def _tolerance(leaf):
  """2e-5 for the weights whose gradient is the deferred contraction (float32
  sums over ticks x batch in another order: up to ~1.2e-5 seen); 1e-4 for the
  rest, autodiff on both sides in differing float32 summation orders (an
  unroll=2 scan alone moves an NLM temperature's gradient by ~4e-5)."""
  deferred_weight = leaf.startswith("['tick']") and leaf.endswith(("['kernel']", "['w1']"))
  return 2e-5 if deferred_weight else 1e-4


def _assert_equal_gradients(ours, reference):
  for leaf, error in _relative_errors(ours, reference).items():
    assert error <= _tolerance(leaf), (leaf, error)


def _slow_unless(default):
  """Parameter marks: the `default` combination in the default suite, the rest slow."""
  return lambda *values: pytest.param(
      *values, marks=() if values == default else pytest.mark.slow
  )


_CASE = _slow_unless(('mlp_synapse', 'none'))


@pytest.mark.parametrize(
    'name, remat', [_CASE(n, r) for n in sorted(CONFIGS) for r in ('none', 'full', 'dots')]
)
def test_float32_gradients_equal_autodiff(name, remat):
  x = _inputs()
  plain = _model(remat=remat, **CONFIGS[name])
  variables = plain.init(jax.random.key(0), x)
  loss, grads = _grads(plain, variables, x)
  loss_d, grads_d = _grads(plain.clone(deferred_grads=True), variables, x)
  assert float(loss_d) == pytest.approx(float(loss), rel=1e-6)
  assert jax.tree.structure(grads_d) == jax.tree.structure(grads)
  _assert_equal_gradients(grads_d, grads)


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_bfloat16_gradients_as_close_to_float32_as_autodiff(remat):
  """bf16 rounds differently per path (per-tick vs one contraction), so each
  is held to the float32 gradient: the deferred one no further from it than
  autodiff's (relative norm, per leaf) plus a bf16 rounding margin."""
  x = _inputs()
  model = _model(remat=remat, synapse_depth=3)
  variables = model.init(jax.random.key(0), x)
  _, exact = _grads(model, variables, x)
  _, autodiff = _grads(model.clone(dtype='bfloat16'), variables, x)
  _, ours = _grads(model.clone(dtype='bfloat16', deferred_grads=True), variables, x)
  assert_as_close_to_float32(exact, autodiff, ours)


def assert_as_close_to_float32(exact, autodiff, ours):
  """Per leaf, `ours` (bf16) no further from the float32 gradient `exact` than
  `autodiff`'s (bf16) is, times 1.5, or 2% (relative norms)."""
  for (path, e), a, o in zip(
      jax.tree_util.tree_leaves_with_path(exact), jax.tree.leaves(autodiff), jax.tree.leaves(ours)
  ):
    if jax.tree_util.keystr(path) in _ZERO_GRADIENTS:
      continue
    norm = float(jnp.linalg.norm(e)) + 1e-12
    err_autodiff = float(jnp.linalg.norm(a - e)) / norm
    err_ours = float(jnp.linalg.norm(o - e)) / norm
    assert err_ours <= max(1.5 * err_autodiff, 0.02), (jax.tree_util.keystr(path), err_ours, err_autodiff)


@pytest.mark.slow
def test_dropout_gradients_equal_autodiff_of_the_same_forward(monkeypatch):
  """Training with dropout: the deferred gradient equals autodiff of the very
  function it replaces (the same scan and dropout masks, no custom VJP)."""
  x = _inputs()
  model = _model(dropout=0.2, deferred_grads=True, synapse_depth=3)
  variables = model.init(jax.random.key(0), x)
  loss_d, grads_d = _grads(model, variables, x, train=True)

  def autodiff_scan(plain, deferring, params, args, rngs, history_of=None):
    del deferring, history_of
    return plain.apply({'params': params}, *args, rngs=rngs)

  monkeypatch.setattr(deferred, 'scan', autodiff_scan)
  loss, grads = _grads(model, variables, x, train=True)
  assert float(loss_d) == pytest.approx(float(loss), rel=1e-6)
  _assert_equal_gradients(grads_d, grads)
  # Dropout is on: a train step's gradient differs from the eval one.
  _, eval_grads = _grads(model, variables, x)
  assert max(_relative_errors(grads, eval_grads).values()) > 1e-3


def test_forward_and_tracking_unchanged():
  x = _inputs()
  model = _model(synapse_depth=3)
  variables = model.init(jax.random.key(0), x)
  out = model.apply(variables, x, track=True)
  out_d = model.clone(deferred_grads=True).apply(variables, x, track=True)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_d)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_init_gives_the_same_parameters():
  x = _inputs()
  a = _model().init(jax.random.key(0), x)
  b = _model(deferred_grads=True).init(jax.random.key(0), x)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(
    'options, message',
    [
        (dict(deferred_grads=True, remat='sqrt'), "deferred_grads=True: records every tick"),
        (dict(deferred_grads='yes'), "deferred_grads='yes': must be True or False"),
    ],
)
def test_bad_options_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    _model(**options)


def test_window_weight_gradient_equals_that_of_the_stacked_windows():
  """The NLM's first layer records only each tick's new trace entry; the
  windows rebuilt from the history give the gradient of the stacked traces."""
  t, d, b, m, o = 5, 3, 2, 4, 6
  keys = jax.random.split(jax.random.key(0), 3)
  history_DxMxB = jax.random.normal(keys[0], (d, m, b))
  newest_TxDxB = jax.random.normal(keys[1], (t, d, b))
  dy_TxDxOxB = jax.random.normal(keys[2], (t, d, o, b))
  traces, trace = [], history_DxMxB
  for tick in range(t):
    trace = ctm.push(trace, newest_TxDxB[tick], axis=1)
    traces.append(trace)
  expected = nlm.SuperLinear.weight_gradient(jnp.stack(traces), dy_TxDxOxB)
  got = nlm.SuperLinear.window_weight_gradient(history_DxMxB, newest_TxDxB, dy_TxDxOxB)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  assert got.shape == (d, o, m)
  # ... and that of the definition: sum over ticks and batch of dy x^T.
  by_hand = jnp.einsum('tdob,tdib->doi', dy_TxDxOxB, jnp.stack(traces))
  np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-5)


class _NLMs(nn.Module):
  do_norm: bool = False
  dropout: float = 0.0
  window: bool = True

  @nn.compact
  def __call__(self, trace_DxMxB, train):
    return nlm.neuron_level_models(
        trace_DxMxB,
        deep=True,
        memory_hidden_dims=4,
        do_norm=self.do_norm,
        dropout=self.dropout,
        train=train,
        dtype=jnp.float32,
        defer=True,
        window=self.window,
    )


@pytest.mark.parametrize(
    'options,train,newest_only',
    [
        ({}, False, True),
        ({'dropout': 0.1}, False, True),  # no dropout outside training
        ({'dropout': 0.1}, True, False),  # the matmul sees dropped-out entries
        ({'do_norm': True}, False, False),  # ... or normalised ones
        ({'window': False}, False, False),  # held examples (Q&A-MNIST): no window
    ],
)
def test_first_nlm_layer_records_the_newest_entry_only_for_a_plain_window(
    options, train, newest_only
):
  trace_DxMxB = jnp.ones((3, 5, 2))
  module = _NLMs(**options)
  variables = module.init(jax.random.key(0), trace_DxMxB, False)
  _, recorded = module.apply(
      {'params': variables['params']},
      trace_DxMxB,
      train,
      rngs={'dropout': jax.random.key(1)},
      mutable=['deferred', 'probes'],
  )
  first = recorded['deferred']['trace_processor_0_0']
  assert set(first) == ({'x_newest'} if newest_only else {'x'})
  if newest_only:
    assert first['x_newest'].shape == (3, 2)
  # The second layer's input (the hidden GLU output) is no window.
  assert set(recorded['deferred']['trace_processor_0_2']) == {'x'}
