"""Neuron synchronisation: pair selection and the recursive decayed update.

Dimensions: B batch, D neurons (d_model), n selected neurons per side,
P synchronisation size (pairs).

Synchronisation of pair k = (i, j) after ticks 0..t is
  S_k = sum_s r_k^(t-s) z_s,i z_s,j / sqrt(sum_s r_k^(t-s)),
computed recursively as alpha <- r alpha + z_i z_j, beta <- r beta + 1.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEURON_SELECT_TYPES = ('first-last', 'random', 'random-pairing')


def synch_size(neuron_select_type: str, n_synch: int) -> int:
  if neuron_select_type == 'random-pairing':
    return n_synch
  return n_synch * (n_synch + 1) // 2


def init_neuron_indices(key, neuron_select_type, side, d_model, n_synch, n_random_pairing_self=0):
  """Left/right neuron indices (n,) for one synchronisation side.

  Random draws are with replacement, as in the reference.
  """
  if neuron_select_type == 'first-last':
    start = 0 if side == 'out' else d_model - n_synch
    idx_n = jnp.arange(start, start + n_synch, dtype=jnp.int32)
    return idx_n, idx_n
  key_left, key_right = jax.random.split(key)
  left_n = jax.random.randint(key_left, (n_synch,), 0, d_model, jnp.int32)
  if neuron_select_type == 'random':
    right_n = jax.random.randint(key_right, (n_synch,), 0, d_model, jnp.int32)
    return left_n, right_n
  n_other = n_synch - n_random_pairing_self
  right_n = jnp.concatenate(
      [
          left_n[:n_random_pairing_self],
          jax.random.randint(key_right, (n_other,), 0, d_model, jnp.int32),
      ]
  )
  return left_n, right_n


def pair_indices(neuron_select_type, left_n, right_n):
  """Neuron index of each pair's two members, (P,) each.

  'first-last' and 'random' use the row-major upper triangle (diagonal
  included) of the left x right product; 'random-pairing' pairs elementwise.
  """
  if neuron_select_type == 'random-pairing':
    return left_n, right_n
  rows_P, cols_P = np.triu_indices(left_n.shape[0])
  return left_n[rows_P], right_n[cols_P]


class SynchState(NamedTuple):
  alpha_BxP: jax.Array
  beta_BxP: jax.Array


def zero_state(batch: int, size: int, dtype=jnp.float32) -> SynchState:
  """Empty history: the first update gives alpha = z_i z_j, beta = 1."""
  zeros = jnp.zeros((batch, size), dtype)
  return SynchState(zeros, zeros)


def update(state: SynchState, z_BxD, left_P, right_P, decay_P):
  """One recursive step; returns (synchronisation_BxP, new_state).

  `decay_P` is used as given: the [0, 15] clamp is a projection applied to the
  parameters outside the differentiated function (see `project_decay_params`).
  """
  r_P = jnp.exp(-decay_P).astype(z_BxD.dtype)
  product_BxP = z_BxD[:, left_P] * z_BxD[:, right_P]
  alpha_BxP = r_P * state.alpha_BxP + product_BxP
  beta_BxP = r_P * state.beta_BxP + 1
  new_state = SynchState(alpha_BxP, beta_BxP)
  return synchronisation(new_state), new_state


def synchronisation(state: SynchState):
  """The synchronisation (B, P) that `state` holds: alpha / sqrt(beta)."""
  return state.alpha_BxP / jnp.sqrt(state.beta_BxP)
