"""The CTM against the PyTorch reference's own numbers (../shared/golden, else tests/golden)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, load_golden, state_dict, to_jax_layout
from ctm_jax.interop import torch as torch_interop
from ctm_jax.models import ctm as ctm_lib
from ctm_jax.models import ff
from ctm_jax.models import lstm
from ctm_jax.models import qamnist
from ctm_jax.models import sort
from ctm_jax.tasks import image
from ctm_jax.tasks import mazes
from ctm_jax.tasks import parity
from ctm_jax.tasks import sort as sort_task

# The *_compact cases (tests/golden) take image_rp's, firstlast_unet8's,
# lstm_parity's and ff_image's code paths at a fraction of their size: they run
# for every cloner, the big ones where ../shared/golden is present.
CASES = [
    'parity', 'image_rp', 'image_compact', 'firstlast_unet8', 'maze_compact', 'none_heads2',
    'sort', 'qamnist', 'lstm_parity', 'lstm_compact', 'lstm_image', 'lstm_maze', 'lstm_qamnist',
    'ff_image', 'ff_compact',
]
ALL_CASES = CASES + [c + '__perturbed' for c in CASES]
# The json's model variant -> our model of that reference class.
VARIANTS = {
    'ctm': ctm_lib.ContinuousThoughtMachine,
    'sort': sort.ContinuousThoughtMachineSORT,
    'qamnist': qamnist.ContinuousThoughtMachineQAMNIST,
    'lstm': lstm.LSTMBaseline,
    'lstm_qamnist': qamnist.LSTMQAMNIST,
    'ff': ff.FFBaseline,
}


def _loss_fn(kind, use_most_certain=True):
  if kind == 'parity':
    return functools.partial(parity.parity_loss, use_most_certain=use_most_certain)
  if kind == 'maze':
    return functools.partial(mazes.maze_loss, use_most_certain=use_most_certain)
  if kind == 'sort':
    return lambda predictions, certainties, targets: (sort_task.sort_loss(predictions, targets),)
  # 'ff_ce', the feed-forward baseline's plain cross-entropy: the image loss of one tick.
  return functools.partial(image.image_classification_loss, use_most_certain=use_most_certain)


def _model_input(arrays):
  """The reference's input in ctm-jax's layout: Q&A-MNIST's (x, z), repeated
  per tick, become the digits and question tokens, once each."""
  if '__in__z' not in arrays:
    return to_jax_layout(arrays['__in__x'])
  digits, question = arrays['__in__x'], arrays['__in__z']  # one tick per digit and token
  batch = digits.shape[0]
  return {
      'digits': jnp.asarray(digits.transpose(0, 1, 3, 4, 2)),
      'question': jnp.asarray(question, jnp.int32),
      'num_digits': jnp.full((batch,), digits.shape[1], jnp.int32),
      'num_operations': jnp.full((batch,), question.shape[1] // 2, jnp.int32),
  }


@functools.lru_cache(maxsize=None)
def _imported(case):
  arrays, meta = load_golden(case)
  model_class = VARIANTS[meta['variant']]
  # Options the reference's Q&A-MNIST classes fix rather than take.
  fixed = {'backbone_type': 'none', 'positional_embedding_type': 'none', 'num_layers': 1}
  kwargs = dict(meta['constructor_kwargs'])
  if issubclass(model_class, qamnist.QAMNISTMixin):
    kwargs.update({k: v for k, v in fixed.items() if k in model_class.__dataclass_fields__})
  model, variables = torch_interop.import_state_dict(state_dict(arrays, meta), kwargs, model_class)
  return arrays, meta, model, variables


@pytest.mark.parametrize('case', ALL_CASES)
def test_forward_matches_reference(case):
  arrays, _, model, variables = _imported(case)
  x = _model_input(arrays)
  out = jax.jit(model.apply)(variables, x)
  if arrays['__out__predictions'].ndim == 2:  # the feed-forward baseline: logits, no ticks
    assert_close(out.predictions[..., 0], arrays['__out__predictions'], what='predictions')
    return
  assert_close(out.predictions, arrays['__out__predictions'], what='predictions')
  assert_close(out.certainties, arrays['__out__certainties'], what='certainties')
  if out.synch_out is None:  # the LSTM baseline has no synchronisation
    assert '__out__synchronisation_out' not in arrays
  else:
    assert_close(out.synch_out, arrays['__out__synchronisation_out'], what='synch_out')


@pytest.mark.parametrize('case', ALL_CASES)
def test_tracking_matches_reference(case):
  arrays, _, model, variables = _imported(case)
  if '__track__predictions' not in arrays:
    pytest.skip(f'{case}: the reference model has no track argument')
  x = _model_input(arrays)
  out = jax.jit(functools.partial(model.apply, track=True))(variables, x)
  assert_close(out.predictions, arrays['__track__predictions'], what='predictions')
  assert_close(out.certainties, arrays['__track__certainties'], what='certainties')
  for name in ('pre_activations', 'post_activations', 'attention', 'synch_out', 'synch_action', 'embeddings'):
    ours, reference = getattr(out.tracking, name), arrays.get(f'__track__{name}')
    if ours is None:  # a model without attention / action synch: the reference tracks nothing
      assert reference is None or reference.size == 0, name
      continue
    if reference is None and name.startswith('synch'):  # the Q&A-MNIST reference tracks no synch
      continue
    assert_close(ours, reference, what=name)


@pytest.mark.parametrize('case', ALL_CASES)
def test_decay_projection_matches_in_place_clamp(case):
  arrays, _, _, variables = _imported(case)
  for side in ('action', 'out'):
    if f'__post__decay_params_{side}' not in arrays:
      continue
    np.testing.assert_array_equal(
        variables['params'][f'decay_params_{side}'], arrays[f'__post__decay_params_{side}']
    )


@pytest.mark.parametrize('case', ALL_CASES)
def test_loss_and_gradients_match_reference(case):
  _check_gradients(*_imported(case))


def _check_gradients(arrays, meta, model, variables):
  """The loss and every parameter's gradient against the reference's."""
  x = _model_input(arrays)
  targets = jnp.asarray(arrays['__target__targets'])
  loss_fn = _loss_fn(meta['loss'], meta.get('use_most_certain', True))

  def loss(params):
    out = model.apply({**variables, 'params': params}, x)
    result = loss_fn(out.predictions, out.certainties, targets)
    return result[0], result[1:]

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  expected = float(arrays['__loss__loss'])
  assert abs(float(value) - expected) <= 1e-5 * max(1.0, abs(expected)), (value, expected)
  if '__loss__where_most_certain' in arrays:  # CTC (sort) selects no tick
    ticks = arrays['__out__predictions'].shape[-1]
    # The reference writes the last tick as -1 when it does not use the most certain.
    np.testing.assert_array_equal(aux[0], arrays['__loss__where_most_certain'] % ticks)
  if meta['loss'] == 'maze':
    np.testing.assert_array_equal(aux[1], arrays['__loss__upto_where'])

  # Map the reference's gradients through the importer to our layout.
  sd = state_dict(arrays, meta)
  constants = torch_interop.reference_constants(model)
  grad_sd = {k: arrays.get(f'__grad__{k}', v) for k, v in sd.items() if k not in constants}
  assert not meta['grads_missing']
  abstract = jax.eval_shape(lambda: variables)
  expected_grads = torch_interop.convert_state_dict(grad_sd, abstract)['params']
  flat_ours = jax.tree_util.tree_leaves_with_path(grads)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(expected_grads))
  assert len(flat_ours) == len(flat_ref)
  for path, ours in flat_ours:
    ref = np.asarray(flat_ref[path], np.float64)
    err = np.abs(np.asarray(ours, np.float64) - ref).max()
    scale = max(np.linalg.norm(ref), 1e-12)
    # The floor covers gradients that are zero in exact arithmetic (the keys'
    # bias: softmax ignores a shift shared by all tokens), where both sides hold
    # only rounding noise of order 1e-9.
    assert err <= 1e-4 * scale + 1e-8, f'{jax.tree_util.keystr(path)}: {err:.3g} vs |g| {scale:.3g}'


@pytest.mark.parametrize('case', CASES)
def test_to_state_dict_gives_back_the_reference_state_dict(case):
  """Exporting imported variables reproduces the reference's own state_dict:
  every key, shape and value (decay parameters after the import's clamp)."""
  arrays, meta, model, variables = _imported(case)
  want = state_dict(arrays, meta)
  got = torch_interop.to_state_dict(variables, model)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].shape == value.shape, key
    if key.endswith('num_batches_tracked'):
      continue  # training counters: 0 in an export
    if key.startswith('decay_params') and not model.decay_clamp_in_graph:
      value = np.clip(value, *ctm_lib.DECAY_CLAMP)
    if key in torch_interop.reference_constants(model):  # computed here: sin/cos to the last bit differ
      np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)
      continue
    np.testing.assert_array_equal(got[key], value, err_msg=key)


# The models whose tick loop runs through ContinuousThoughtMachine.run_ticks.
DEFERRED_CASES = [
    'parity', 'image_rp', 'image_compact', 'firstlast_unet8', 'maze_compact', 'none_heads2', 'sort',
    'qamnist',
]


@pytest.mark.parametrize(
    'case',
    [c if c == 'parity' else pytest.param(c, marks=pytest.mark.slow) for c in DEFERRED_CASES]
    + [pytest.param(c + '__perturbed', marks=pytest.mark.slow) for c in DEFERRED_CASES],
)
def test_deferred_gradients_match_reference(case):
  """models/deferred.py's weight gradients (config.model.deferred_grads)
  against the reference's, as autodiff's are above."""
  arrays, meta, model, variables = _imported(case)
  _check_gradients(arrays, meta, model.clone(deferred_grads=True), variables)
