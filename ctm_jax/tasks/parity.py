"""Cumulative parity (the reference's tasks/parity): the default task.

Inputs (B, L) of +-1, targets (B, L): the parity of each prefix. The model
answers all L bits at every tick (out_dims 2L, reshaped (L, 2)).

Dimension glossary: B batch, T ticks, L parity sequence length.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import losses
from ctm_jax.data import parity as parity_data
from ctm_jax.tasks import base


def parity_loss(predictions_BxOxT, certainties_Bx2xT, targets_BxL, use_most_certain: bool = True):
  """Cumulative-parity loss; predictions (B, 2L, T) or (B, L, 2, T).

  The cross-entropy is averaged over sequence positions before tick selection.
  """
  batch, ticks = predictions_BxOxT.shape[0], predictions_BxOxT.shape[-1]
  logits_BxLx2xT = predictions_BxOxT.reshape(batch, -1, 2, ticks)
  loss_BxLxT = jax.vmap(losses.per_tick_cross_entropy, in_axes=(1, 1), out_axes=1)(
      logits_BxLx2xT, targets_BxL
  )
  return losses.select_ticks(loss_BxLxT.mean(1), certainties_Bx2xT, use_most_certain)


@base.register
class Parity(base.Task):
  name = 'parity'
  config_keys = frozenset({'parity_sequence_length'})
  identity_keys = ('parity_sequence_length',)
  reference_model_field = 'model_type'

  def validate(self, config):
    length = config.parity_sequence_length
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
      raise ValueError(f'config.parity_sequence_length={length!r}: must be a positive integer')

  def record_spec(self, config):
    length = config.parity_sequence_length
    return {
        'inputs': ((length,), np.dtype(np.float32)),
        'targets': ((length,), np.dtype(np.int32)),
    }

  def train_source(self, config):
    return parity_data.train_source(config.parity_sequence_length, config.seed)

  def eval_source(self, config):
    return parity_data.eval_source(config.parity_sequence_length, config.seed)

  def synthetic_batch(self, config, batch_size, seed):
    rng = np.random.default_rng(seed)
    inputs_BxL = (2 * rng.integers(0, 2, (batch_size, config.parity_sequence_length)) - 1).astype(
        np.float32
    )
    return {'inputs': inputs_BxL, 'targets': parity_data.parity_targets(inputs_BxL)}

  def model_kwargs(self, config):
    length = config.parity_sequence_length
    return {**config.model.to_dict(), 'out_dims': 2 * length, 'prediction_reshaper': (length, 2)}

  def loss(self, config, output, batch):
    loss, most_certain_B = parity_loss(
        output.predictions, output.certainties, batch['targets'], config.use_most_certain
    )
    return loss, {'most_certain_B': most_certain_B}

  def correct(self, output, batch):
    """Per-bit accuracy of every tick, (B, T)."""
    batch_size, _, ticks = output.predictions.shape
    logits_BxLx2xT = output.predictions.reshape(batch_size, -1, 2, ticks)
    hits_BxLxT = jnp.argmax(logits_BxLx2xT, axis=2) == batch['targets'][..., None]
    return hits_BxLxT.mean(axis=1)

  def matches_reference_args(self, args):
    return 'parity_sequence_length' in args or args.get('dataset') == 'parity'

  def reference_model_kwargs(self, args):
    length = int(base.required_arg(args, 'parity_sequence_length', self.name))
    # The parity script leaves dropout_nlm at the constructor default (None).
    return {'out_dims': 2 * length, 'prediction_reshaper': [length, 2], 'dropout_nlm': None}
