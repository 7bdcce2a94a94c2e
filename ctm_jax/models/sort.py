"""The sorting CTM (the reference's ContinuousThoughtMachineSORT).

No backbone, no attention and no action synchronisation: the N numbers to
sort are concatenated to the post-activations and fed to the synapses every
tick. Its output is N + 1 classes per tick (the N positions and the CTC
blank, last), read as a sequence over the ticks (ctm_jax/tasks/sort.py).
The synch decays are clamped inside the graph, as the reference's sort model
does.

Dimension glossary: B batch, N numbers to sort, T ticks.
"""

from typing import ClassVar

import jax.numpy as jnp

from ctm_jax.models import ctm


class ContinuousThoughtMachineSORT(ctm.ContinuousThoughtMachine):
  """Constructor as the reference's: `heads`, `n_synch_action`,
  `backbone_type` and `positional_embedding_type` are accepted and ignored
  (forced to 0, 0, 'none', 'none'). Input (B, N) floats, `d_input` = N."""

  attends: ClassVar[bool] = False
  decay_clamp_in_graph: ClassVar[bool] = True

  def __post_init__(self):
    for field, value in (
        ('heads', 0),
        ('n_synch_action', 0),
        ('backbone_type', 'none'),
        ('positional_embedding_type', 'none'),
    ):
      object.__setattr__(self, field, value)
    super().__post_init__()

  def check_input(self, x) -> None:
    if x.ndim != 2 or x.shape[1] != self.d_input:
      raise ValueError(f'x.shape={tuple(x.shape)!r}: the sort model takes (B, N={self.d_input}) numbers')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'x.dtype={x.dtype}: the sort model takes floats')

  def tick_inputs(self, x, train):
    del train
    return ctm.TickInputs(), ctm.TickInputs(features_BxE=x)
