"""Behaviour of the CTM: structure the paper relies on, and bad input handling."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax.models import ctm as ctm_lib
from ctm_jax.models import nlm

TINY = dict(
    iterations=4,
    d_model=16,
    d_input=8,
    heads=2,
    n_synch_out=6,
    n_synch_action=4,
    synapse_depth=1,
    memory_length=5,
    deep_nlms=True,
    memory_hidden_dims=3,
    do_layernorm_nlm=False,
    backbone_type='parity_backbone',
    positional_embedding_type='custom-rotational-1d',
    out_dims=12,
    prediction_reshaper=(6, 2),
    neuron_select_type='random',
)


def _model(**overrides):
  return ctm_lib.ContinuousThoughtMachine(**{**TINY, **overrides})


def _parity_input(batch=3, length=6, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.choice([-1.0, 1.0], size=(batch, length)), jnp.float32)


def _init(model, x, seed=0):
  variables = model.init(jax.random.key(seed), x)
  # Non-zero decays so that the recursion is exercised.
  params = dict(variables['params'])
  for name in ctm_lib.DECAY_PARAM_NAMES:
    key = jax.random.key(hash(name) % 1000)
    params[name] = jax.random.uniform(key, params[name].shape, minval=0.0, maxval=2.0)
  return {**variables, 'params': params}


def test_output_shapes():
  model, x = _model(), _parity_input()
  variables = _init(model, x)
  out = model.apply(variables, x)
  assert out.predictions.shape == (3, 12, 4)
  assert out.certainties.shape == (3, 2, 4)
  assert out.synch_out.shape == (3, model.synch_size_out)
  assert out.tracking is None
  tracked = model.apply(variables, x, track=True)
  t = tracked.tracking
  assert t.pre_activations.shape == t.post_activations.shape == (4, 3, 16)
  assert t.attention.shape == (4, 3, 2, 1, 6)
  assert t.synch_out.shape == (4, 3, 21) and t.synch_action.shape == (4, 3, 10)
  np.testing.assert_allclose(t.attention.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(tracked.predictions, out.predictions, rtol=1e-6)


def test_nlm_is_private_per_neuron():
  """Jacobian of z (D) w.r.t. the trace (D, M) is zero off the neuron diagonal."""

  class NLM(nn.Module):

    @nn.compact
    def __call__(self, trace_DxMxB):
      return nlm.neuron_level_models(
          trace_DxMxB,
          deep=True,
          memory_hidden_dims=4,
          do_norm=True,
          dropout=0.0,
          train=False,
          dtype=jnp.float32,
      )

  trace = jax.random.normal(jax.random.key(1), (7, 5, 1))
  module = NLM()
  params = module.init(jax.random.key(0), trace)
  jac_DxDxM = jax.jacobian(lambda t: module.apply(params, t)[:, 0])(trace)[..., 0]
  magnitude_DxD = np.abs(np.asarray(jac_DxDxM)).sum(-1)
  off_diagonal = magnitude_DxD * (1 - np.eye(7))
  assert off_diagonal.max() == 0.0
  assert (np.diag(magnitude_DxD) > 0).all()


@pytest.mark.parametrize('select', ['random', 'random-pairing', 'first-last'])
def test_recursive_synch_equals_brute_force(select):
  """S_k(t) = sum_s r^(t-s) z_s,i z_s,j / sqrt(sum_s r^(t-s)) over the full history."""
  model = _model(neuron_select_type=select, n_random_pairing_self=2, iterations=6)
  x = _parity_input()
  variables = _init(model, x)
  out = model.apply(variables, x, track=True)
  params, indices = variables['params'], variables['synch']
  z0_BxD = np.broadcast_to(np.asarray(params['start_activated_state']), (3, 16))
  history_SxBxD = np.concatenate([z0_BxD[None], np.asarray(out.tracking.post_activations)], 0)

  def brute(side, history):
    left, right = (np.asarray(indices[f'{side}_neuron_indices_{s}']) for s in ('left', 'right'))
    if select != 'random-pairing':
      rows, cols = np.triu_indices(len(left))
      left, right = left[rows], right[cols]
    r_P = np.exp(-np.asarray(params[f'decay_params_{side}'], np.float64))
    ages = np.arange(len(history))[::-1]
    weights_SxP = r_P[None] ** ages[:, None]
    products_SxBxP = history[:, :, left] * history[:, :, right]
    return (weights_SxP[:, None] * products_SxBxP).sum(0) / np.sqrt(weights_SxP.sum(0))

  for t in range(6):
    # The output synch of tick t sees z_0..z_{t+1}; the action synch z_0..z_t.
    np.testing.assert_allclose(
        out.tracking.synch_out[t], brute('out', history_SxBxD[: t + 2]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        out.tracking.synch_action[t], brute('action', history_SxBxD[: t + 1]), rtol=1e-5, atol=1e-6
    )


def _loss_and_grads(model, variables, x):
  def loss(params):
    out = model.apply({**variables, 'params': params}, x)
    return jnp.sum(out.predictions**2) + jnp.sum(out.certainties)

  return jax.value_and_grad(loss)(variables['params'])


def test_jit_equals_no_jit():
  model, x = _model(), _parity_input()
  variables = _init(model, x)
  eager = model.apply(variables, x)
  jitted = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(jitted.predictions, eager.predictions, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jitted.certainties, eager.certainties, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    'policy', [pytest.param('full', marks=pytest.mark.slow), pytest.param('dots', marks=pytest.mark.slow), 'sqrt']
)
def test_remat_equals_no_remat(policy):
  x = _parity_input()
  plain = _model()
  variables = _init(plain, x)
  value, grads = jax.jit(functools.partial(_loss_and_grads, plain))(variables, x)
  remat_value, remat_grads = jax.jit(functools.partial(_loss_and_grads, _model(remat=policy)))(
      variables, x
  )
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads, grads
  )


def test_same_key_same_init_and_indices_from_key():
  model, x = _model(), _parity_input()
  a, b = model.init(jax.random.key(3), x), model.init(jax.random.key(3), x)
  chex.assert_trees_all_equal(a, b)
  c = model.init(jax.random.key(4), x)
  assert set(a) == {'params', 'synch'}
  assert not np.array_equal(
      a['synch']['out_neuron_indices_left'], c['synch']['out_neuron_indices_left']
  )
  for name, idx in a['synch'].items():
    assert idx.dtype == jnp.int32 and (0 <= idx).all() and (idx < 16).all(), name


def test_random_pairing_self_pairs():
  model = _model(neuron_select_type='random-pairing', n_random_pairing_self=3)
  variables = model.init(jax.random.key(0), _parity_input())
  synch = variables['synch']
  for side in ('out', 'action'):
    np.testing.assert_array_equal(
        synch[f'{side}_neuron_indices_left'][:3], synch[f'{side}_neuron_indices_right'][:3]
    )


def test_first_last_uses_first_and_last_neurons():
  variables = _model(neuron_select_type='first-last').init(jax.random.key(0), _parity_input())
  np.testing.assert_array_equal(variables['synch']['out_neuron_indices_left'], np.arange(6))
  np.testing.assert_array_equal(variables['synch']['action_neuron_indices_left'], np.arange(12, 16))


def test_trace_size_does_not_grow_with_iterations():
  x = _parity_input()

  def n_eqns(iterations):
    model = _model(iterations=iterations)
    variables = _init(model, x)
    return len(jax.make_jaxpr(model.apply)(variables, x).jaxpr.eqns)

  assert n_eqns(2) == n_eqns(50)


def test_projection_clamps_only_decay_params():
  model, x = _model(), _parity_input()
  params = model.init(jax.random.key(0), x)['params']
  params = {
      **params,
      'decay_params_out': params['decay_params_out'].at[:2].set(jnp.array([-1.0, 20.0])),
      'start_trace': params['start_trace'] + 100.0,
  }
  projected = ctm_lib.project_decay_params(params)
  assert float(projected['decay_params_out'][0]) == 0.0
  assert float(projected['decay_params_out'][1]) == 15.0
  np.testing.assert_array_equal(projected['start_trace'], params['start_trace'])


@pytest.mark.slow
def test_decay_gradient_is_not_zeroed_outside_range():
  """Like the reference's in-place clamp, the forward uses the value as is."""
  model, x = _model(), _parity_input()
  variables = _init(model, x)
  params = dict(variables['params'])
  params['decay_params_out'] = params['decay_params_out'].at[0].set(-1.0)
  _, grads = _loss_and_grads(model, {**variables, 'params': params}, x)
  assert float(jnp.abs(grads['decay_params_out'][0])) > 0


def test_dropout_uses_rng_in_training_only():
  model, x = _model(dropout=0.3), _parity_input()
  variables = _init(model, x)
  a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a.predictions, b.predictions)
  e1, e2 = model.apply(variables, x), model.apply(variables, x)
  np.testing.assert_array_equal(e1.predictions, e2.predictions)


def test_batch_norm_statistics_update_in_training():
  model = _model(
      backbone_type='resnet18-1',
      positional_embedding_type='learnable-fourier',
      out_dims=10,
      prediction_reshaper=(-1,),
      iterations=2,
  )
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  variables = model.init(jax.random.key(0), x)
  assert 'batch_stats' in variables
  out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out.predictions.shape == (2, 10, 2)
  changed = jax.tree.map(
      lambda a, b: not np.allclose(a, b), variables['batch_stats'], updates['batch_stats']
  )
  assert all(jax.tree.leaves(changed))
  eval_out = model.apply(variables, x)  # eval mode needs no mutable collection
  assert np.isfinite(eval_out.predictions).all()


@pytest.mark.slow
def test_image_backbones_and_embeddings_run():
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  for backbone, pe in [
      ('resnet18-2', 'custom-rotational'),
      ('resnet50-1', 'multi-learnable-fourier'),
      ('resnet18-1', 'none'),
      ('none', 'none'),
  ]:
    model = _model(
        backbone_type=backbone,
        positional_embedding_type=pe,
        out_dims=5,
        prediction_reshaper=(-1,),
        iterations=2,
    )
    variables = model.init(jax.random.key(0), x)
    out = model.apply(variables, x)
    assert out.predictions.shape == (2, 5, 2), backbone
    assert np.isfinite(out.predictions).all(), backbone


# --- Bad input: ValueError naming the field and the value, before tracing ---

BAD_OPTIONS = [
    (dict(backbone_type='resnet19-1'), 'backbone_type', 'resnet19-1'),
    (dict(positional_embedding_type='sinusoid'), 'positional_embedding_type', 'sinusoid'),
    (dict(neuron_select_type='first-last', d_model=9), 'd_model', '9'),
    (
        dict(backbone_type='none', positional_embedding_type='learnable-fourier'),
        'positional_embedding_type',
        'learnable-fourier',
    ),
    (
        dict(neuron_select_type='random-pairing', n_random_pairing_self=4),
        'n_random_pairing_self',
        '4',
    ),
    (dict(d_input=9, heads=2), 'd_input', '9'),
    (dict(prediction_reshaper=(5, 2)), 'prediction_reshaper', '[5, 2]'),
    (dict(prediction_reshaper=(-1, 5)), 'prediction_reshaper', '[-1, 5]'),
    (dict(neuron_select_type='pairs'), 'neuron_select_type', 'pairs'),
    (dict(iterations=0), 'iterations', '0'),
    (dict(heads=0), 'heads', '0'),
    (dict(dropout=1.5), 'dropout', '1.5'),
    (dict(remat='sometimes'), 'remat', 'sometimes'),
    (dict(backbone_remat='blocks'), 'backbone_remat', 'blocks'),
]


@pytest.mark.parametrize('overrides,field,value', BAD_OPTIONS)
def test_bad_option_names_field_and_value(overrides, field, value):
  with pytest.raises(ValueError) as info:
    _model(**overrides)
  assert field in str(info.value) and value in str(info.value)


BAD_INPUTS = [
    ({}, jnp.ones((2, 3, 4)), 'x.shape'),
    ({}, jnp.ones((2, 6), jnp.complex64), 'x.dtype'),
    (
        dict(
            backbone_type='resnet18-1',
            positional_embedding_type='none',
            out_dims=5,
            prediction_reshaper=(-1,),
        ),
        jnp.ones((2, 8, 8)),
        'x.shape',
    ),
    (
        dict(
            backbone_type='resnet18-1',
            positional_embedding_type='none',
            out_dims=5,
            prediction_reshaper=(-1,),
        ),
        jnp.ones((2, 8, 8, 3), jnp.int32),
        'x.dtype',
    ),
    (
        dict(
            backbone_type='none',
            positional_embedding_type='none',
            out_dims=5,
            prediction_reshaper=(-1,),
        ),
        jnp.ones((2, 8)),
        'x.shape',
    ),
]


@pytest.mark.parametrize('overrides,x,field', BAD_INPUTS)
def test_bad_input_names_field(overrides, x, field):
  model = _model(**overrides)
  with pytest.raises(ValueError) as info:
    model.init(jax.random.key(0), x)
  assert field in str(info.value) and str(tuple(x.shape) if 'shape' in field else x.dtype) in str(
      info.value
  )


def test_bad_spatial_shape_for_rotational_embedding():
  model = _model(
      backbone_type='resnet18-1',
      positional_embedding_type='custom-rotational',
      out_dims=5,
      prediction_reshaper=(-1,),
  )
  with pytest.raises(ValueError, match='custom-rotational'):
    model.init(jax.random.key(0), jnp.ones((1, 16, 24, 3)))


class _PerTickInputCTM(ctm_lib.ContinuousThoughtMachine):
  """A different input every tick, fed straight to the synapses (the Q&A-MNIST /
  sort / RL shape), built from the same tick as the main class. Returns the
  outputs and the final tick state, and can start from a given state."""

  attends = False

  @nn.compact
  def __call__(self, inputs_TxBxE, state=None):
    synch_params = self.synch_params()
    if state is None:
      state = self.initial_state(inputs_TxBxE.shape[1], synch_params)
      state = state._replace(z_trace_BxDxM=jnp.zeros_like(state.trace_DxMxB.transpose(2, 0, 1)))
    final, per_tick = self.run_ticks(
        state,
        ctm_lib.TickInputs(features_BxE=inputs_TxBxE),
        ctm_lib.TickInputs(),
        synch_params,
        train=False,
        track=True,
        length=inputs_TxBxE.shape[0],
    )
    return self.outputs(final, per_tick, track=True), final


DIRECT = {
    **TINY,
    'heads': 0,
    'n_synch_action': 0,
    'backbone_type': 'none',
    'positional_embedding_type': 'none',
}


def test_tick_takes_a_per_tick_input_without_attention():
  model = _PerTickInputCTM(**DIRECT)
  inputs = jax.random.normal(jax.random.key(0), (5, 3, 8))
  variables = model.init(jax.random.key(0), inputs)
  assert 'decay_params_action' not in variables['params']
  out, _ = model.apply(variables, inputs)
  assert out.predictions.shape == (3, 12, 5)
  assert out.tracking.attention is None and out.tracking.synch_action is None
  # Causality: changing the input of tick 3 leaves ticks 0..2 unchanged.
  changed, _ = model.apply(variables, inputs.at[3].add(1.0))
  np.testing.assert_array_equal(changed.predictions[..., :3], out.predictions[..., :3])
  assert not np.allclose(changed.predictions[..., 3:], out.predictions[..., 3:])
  with pytest.raises(ValueError, match='heads=2'):
    _PerTickInputCTM(**{**TINY, 'n_synch_action': 0})


def test_tick_state_carries_across_calls():
  """Two calls of k ticks, the second starting from the first's final state,
  equal one call of 2k ticks; the post-activation window is carried too (RL)."""
  model = _PerTickInputCTM(**DIRECT)
  inputs = jax.random.normal(jax.random.key(0), (6, 2, 8))
  variables = model.init(jax.random.key(0), inputs)
  whole_out, whole = model.apply(variables, inputs)
  _, first = model.apply(variables, inputs[:3])
  second_out, second = model.apply(variables, inputs[3:], first)
  chex.assert_trees_all_close(second, whole, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(second_out.predictions, whole_out.predictions[..., 3:], rtol=1e-6)
  # The window holds the last M = 5 post-activations, oldest first.
  np.testing.assert_allclose(
      whole.z_trace_BxDxM, np.moveaxis(whole_out.tracking.post_activations[-5:], 0, -1), rtol=1e-6
  )


def test_bfloat16_compute_keeps_float32_parameters():
  x = _parity_input()
  f32 = _model()
  variables = _init(f32, x)
  bf16 = _model(dtype=jnp.bfloat16)
  bf16_params = bf16.init(jax.random.key(0), x)['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_params))
  out16 = jax.jit(bf16.apply)(variables, x)
  out32 = jax.jit(f32.apply)(variables, x)
  assert out16.predictions.dtype == jnp.float32
  # bf16 keeps ~3 significant digits; the logits stay close to float32's.
  np.testing.assert_allclose(out16.predictions, out32.predictions, atol=0.05, rtol=0.05)


def test_backbone_remat_checkpoints_every_resnet_block():
  """backbone_remat reaches the ResNet: one checkpoint per residual block in
  the training gradient, same parameters (values: tests/backbones_test.py)."""
  x = jnp.ones((2, 8, 8, 3), jnp.float32)
  image = dict(
      backbone_type='resnet18-2',
      positional_embedding_type='none',
      out_dims=5,
      prediction_reshaper=(-1,),
  )
  plain, remat = _model(**image), _model(**image, backbone_remat='block')
  variables = jax.eval_shape(plain.init, jax.random.key(0), x)
  remat_variables = jax.eval_shape(remat.init, jax.random.key(0), x)
  assert jax.tree.structure(remat_variables) == jax.tree.structure(variables)

  def grad_jaxpr(model):
    def loss(params, others):
      out, _ = model.apply(
          {**others, 'params': params},
          x,
          train=True,
          mutable=['batch_stats'],
          rngs={'dropout': jax.random.key(1)},
      )
      return out.predictions.sum()

    others = {k: v for k, v in variables.items() if k != 'params'}
    return str(jax.make_jaxpr(jax.grad(loss))(variables['params'], others))

  blocks = sum(1 for name in variables['params']['backbone'] if name.startswith('layer'))
  assert blocks == 4
  assert grad_jaxpr(remat).count('remat') - grad_jaxpr(plain).count('remat') == blocks
