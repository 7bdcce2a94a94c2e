"""The RL recurrent models against the PyTorch reference's numbers (../shared/golden)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, load_golden, state_dict
from ctm_jax.interop import torch as torch_interop
from ctm_jax.models import agent

CASES = ['rl_classic', 'rl_navigation', 'lstm_rl_classic', 'lstm_rl_navigation']
ALL_CASES = CASES + [c + '__perturbed' for c in CASES]


def _is_lstm(case):
  return case.startswith('lstm_')


@functools.lru_cache(maxsize=None)
def _imported(case):
  arrays, meta = load_golden(case)
  model_class = agent.LSTMRL if _is_lstm(case) else agent.ContinuousThoughtMachineRL
  model, variables = torch_interop.import_state_dict(
      state_dict(arrays, meta), meta['constructor_kwargs'], model_class
  )
  return arrays, meta, model, variables


def _inputs(case, arrays):
  x = jnp.asarray(arrays['__in__x'])
  if _is_lstm(case):
    carry = (arrays['__in__hidden_state'], arrays['__in__cell_state'])
  else:
    carry = (arrays['__in__hidden_state_trace'], arrays['__in__hidden_activated_state_trace'])
  return x, tuple(jnp.asarray(c) for c in carry)


def _expected(case, arrays, prefix):
  if _is_lstm(case):
    return (
        arrays[f'{prefix}hidden_state'],
        (arrays[f'{prefix}new_hidden_state'], arrays[f'{prefix}new_cell_state']),
    )
  return (
      arrays[f'{prefix}synchronisation_out'],
      (arrays[f'{prefix}state_trace'], arrays[f'{prefix}activated_state_trace']),
  )


def _reference_grads(arrays, meta, model, variables):
  """The golden's parameter gradients in our params' tree, flattened by path
  (zero where the reference has none)."""
  sd = state_dict(arrays, meta)
  constants = torch_interop.reference_constants(model)
  grad_sd = {
      k: arrays.get(f'__grad__{k}', np.zeros_like(v)) for k, v in sd.items() if k not in constants
  }
  expected_grads = torch_interop.convert_state_dict(grad_sd, jax.eval_shape(lambda: variables))['params']
  return dict(jax.tree_util.tree_leaves_with_path(expected_grads))


@pytest.mark.parametrize('case', ALL_CASES)
@pytest.mark.parametrize('track', [False, True])
def test_forward_and_carried_state_match_reference(case, track):
  arrays, _, model, variables = _imported(case)
  x, carry = _inputs(case, arrays)
  hidden, new_carry, tracking = jax.jit(functools.partial(model.apply, track=track))(variables, x, carry)
  want_hidden, want_carry = _expected(case, arrays, '__track__' if track else '__out__')
  assert_close(hidden, want_hidden, what='representation')
  assert_close(new_carry[0], want_carry[0], what='carry[0]')
  assert_close(new_carry[1], want_carry[1], what='carry[1]')
  if track:
    for name in ('pre_activations', 'post_activations'):
      assert_close(tracking[name], arrays[f'__track__{name}'], what=name)


@pytest.mark.parametrize('case', ALL_CASES)
def test_loss_and_gradients_match_reference(case):
  """The goldens' loss is mean(representation**2): every parameter's gradient
  through the ticks, the synch window and (CTM) the in-graph decay clamp."""
  arrays, meta, model, variables = _imported(case)
  x, carry = _inputs(case, arrays)

  def loss(params):
    hidden, _, _ = model.apply({**variables, 'params': params}, x, carry)
    return jnp.mean(hidden**2)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables['params'])
  expected = float(arrays['__loss__loss'])
  assert abs(float(value) - expected) <= 1e-5 * max(1.0, abs(expected)), (value, expected)
  # The start states feed only the agent (get_initial_state), not this forward.
  assert sorted(meta['grads_missing']) == sorted(
      ['start_hidden_state', 'start_cell_state'] if _is_lstm(case) else ['start_trace', 'start_activated_trace']
  )
  flat_ref = _reference_grads(arrays, meta, model, variables)
  for path, ours in jax.tree_util.tree_leaves_with_path(grads):
    ref = np.asarray(flat_ref[path], np.float64)
    err = np.abs(np.asarray(ours, np.float64) - ref).max()
    scale = max(np.linalg.norm(ref), 1e-12)
    assert err <= 1e-4 * scale + 1e-8, f'{jax.tree_util.keystr(path)}: {err:.3g} vs |g| {scale:.3g}'


@pytest.mark.parametrize('case', ['rl_classic__perturbed', 'rl_navigation', 'lstm_rl_classic'])
def test_the_training_replay_of_one_step_matches_the_reference(case):
  """`replay` (PPO's update: features, synapse projection, synch and heads
  out of the step scan) over one step from the golden's carry gives the
  reference's representation, and its gradients the reference's."""
  arrays, meta, model, variables = _imported(case)
  x, carry = _inputs(case, arrays)
  not_done = jnp.zeros((1, x.shape[0]), bool)

  def replay(module):
    return module.replay(module.features(x)[None], carry, not_done, True)[0]

  def loss(params):
    return jnp.mean(model.apply({**variables, 'params': params}, method=replay) ** 2)

  hidden = jax.jit(lambda v: model.apply(v, method=replay))(variables)
  assert_close(hidden, _expected(case, arrays, '__out__')[0], what='representation')
  grads = jax.jit(jax.grad(loss))(variables['params'])
  step_grads = jax.jit(
      jax.grad(lambda p: jnp.mean(model.apply({**variables, 'params': p}, x, carry)[0] ** 2))
  )(variables['params'])
  flat_ref = _reference_grads(arrays, meta, model, variables)
  flat_step = dict(jax.tree_util.tree_leaves_with_path(step_grads))
  for path, ours in jax.tree_util.tree_leaves_with_path(grads):
    for name, want in (('reference', flat_ref[path]), ('autodiff of one step', flat_step[path])):
      want = np.asarray(want, np.float64)
      err = np.abs(np.asarray(ours, np.float64) - want).max()
      scale = max(np.linalg.norm(want), 1e-12)
      assert err <= 1e-4 * scale + 1e-8, f'{jax.tree_util.keystr(path)} vs {name}: {err:.3g} vs |g| {scale:.3g}'


@pytest.mark.parametrize('case', CASES)
def test_to_state_dict_gives_back_the_reference_state_dict(case):
  arrays, meta, model, variables = _imported(case)
  want = state_dict(arrays, meta)
  got = torch_interop.to_state_dict(variables, model)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_decays_outside_the_clamp_get_no_gradient():
  """The perturbed file's decay 0 is -1 and decay 1 is 20: clamped in the graph to
  [0, 4], so both have zero gradient (torch.clamp), the others do not."""
  arrays, meta, model, variables = _imported('rl_classic__perturbed')
  decay = np.asarray(variables['params']['decay_params_out'])
  assert decay[0] == -1 and decay[1] == 20
  np.testing.assert_array_equal(arrays['__grad__decay_params_out'][:2], 0)
  x, carry = _inputs('rl_classic', arrays)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({**variables, 'params': p}, x, carry)[0] ** 2)))(
      variables['params']
  )
  g = np.asarray(grads['decay_params_out'])
  assert np.all(g[:2] == 0) and np.any(g[2:] != 0)
  del meta
