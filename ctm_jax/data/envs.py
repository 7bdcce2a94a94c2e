"""Environments in JAX for the RL task: the reference's gymnasium environments.

Every environment here has one interface, for one environment (the trainer
vmaps it over environments and jits everything):

  reset(key) -> (state, obs)
  step(key, state, action) -> (state, obs, reward, terminated)   # no auto-reset
  truncated(state) -> bool: the episode reached `max_environment_steps`
  render(state) -> (H, W, 3) uint8 frame, on the host (evaluation gifs)

and `num_actions`, `action_names`, `observation_shape`, `observation_dtype`,
`backbone_type` (the agent backbone that reads its observations) and `goal`
(whether a positive terminal reward means success, reported as a rate).

* CartPole-v1 and Acrobot-v1: gymnax's dynamics (gymnasium's equations, in
  float32), with the reference's velocity masks (`mask_velocity`: CartPole
  keeps x and theta, Acrobot the four angle terms) and a time limit of
  `max_environment_steps` (the reference's TimeLimit wrapper).
* MiniGrid-FourRooms-v0: ctm_jax/data/minigrid.py (xland-minigrid's grid,
  MiniGrid's observation, actions and rewards).

`RewardNormaliser` is gymnasium's NormalizeReward (the reference wraps every
environment in it): rewards divided by the running standard deviation of a
per-environment discounted return, which restarts only on termination.

Dimension glossary: B environments, F observation features.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import extras

ACTION_NAMES = {
    'CartPole-v1': ('left', 'right'),
    'Acrobot-v1': ('-1', '0', '+1'),  # torque
}
CLASSIC_CONTROL = {
    # id: the reference's velocity mask over the observation.
    'CartPole-v1': (1.0, 0.0, 1.0, 0.0),
    'Acrobot-v1': (1.0, 1.0, 1.0, 1.0, 0.0, 0.0),
}
MINIGRID = ('MiniGrid-FourRooms-v0',)
ENV_IDS = tuple(CLASSIC_CONTROL) + MINIGRID
# Beyond every time limit here: gymnax's own limit stays out of the way.
_NO_LIMIT = 2**30


@dataclasses.dataclass(frozen=True)
class ClassicControl:
  """A gymnax classic-control environment with the reference's wrappers."""

  env_id: str
  max_environment_steps: int
  mask_velocity: bool = True

  backbone_type = 'classic-control-backbone'
  observation_dtype = jnp.float32
  goal = False  # no success rate: episodes end by failing (CartPole) or by reaching the line

  def __post_init__(self):
    gymnax = extras.module('gymnax', f'env_id={self.env_id!r}')
    env, params = gymnax.make(self.env_id)
    object.__setattr__(self, '_env', env)
    object.__setattr__(self, '_params', params.replace(max_steps_in_episode=_NO_LIMIT))

  @property
  def num_actions(self) -> int:
    return int(self._env.num_actions)

  @property
  def action_names(self) -> tuple[str, ...]:
    return ACTION_NAMES[self.env_id]

  @property
  def observation_shape(self) -> tuple[int, ...]:
    return (len(CLASSIC_CONTROL[self.env_id]),)

  def _observe(self, obs_F):
    obs_F = obs_F.astype(jnp.float32)
    if self.mask_velocity:
      obs_F = obs_F * jnp.asarray(CLASSIC_CONTROL[self.env_id], jnp.float32)
    return obs_F

  def reset(self, key):
    obs_F, state = self._env.reset_env(key, self._params)
    return state, self._observe(obs_F)

  def step(self, key, state, action):
    obs_F, state, reward, terminated, _ = self._env.step_env(key, state, action, self._params)
    return state, self._observe(obs_F), jnp.asarray(reward, jnp.float32), jnp.asarray(terminated, bool)

  def truncated(self, state):
    return state.time >= self.max_environment_steps

  def render(self, state) -> np.ndarray:
    return _render_classic(self.env_id, jax.device_get(state))


def make(env_id: str, max_environment_steps: int, mask_velocity: bool = True):
  """The environment `env_id`; ValueError naming the known ids otherwise."""
  if env_id in CLASSIC_CONTROL:
    return ClassicControl(env_id, max_environment_steps, mask_velocity)
  if env_id in MINIGRID:
    extras.require('rl', f'env_id={env_id!r}')
    from ctm_jax.data import minigrid  # pylint: disable=g-import-not-at-top

    return minigrid.FourRooms(max_environment_steps)
  raise ValueError(f'env_id={env_id!r}: expected one of {", ".join(map(repr, ENV_IDS))}')


@flax.struct.dataclass
class RewardNormaliser:
  """gymnasium's NormalizeReward per environment: a running mean/var of the
  discounted return (count starting at 1e-4, var at 1)."""

  discounted_B: jax.Array
  mean_B: jax.Array
  var_B: jax.Array
  count_B: jax.Array

  @classmethod
  def create(cls, batch: int):
    zeros = jnp.zeros((batch,), jnp.float32)
    return cls(zeros, zeros, jnp.ones((batch,), jnp.float32), jnp.full((batch,), 1e-4, jnp.float32))

  def __call__(self, reward_B, terminated_B, gamma: float, epsilon: float = 1e-8):
    """(normalised reward, new state) for one step of every environment."""
    discounted_B = self.discounted_B * gamma * (1.0 - terminated_B.astype(jnp.float32)) + reward_B
    # A batch of one sample: mean = the sample, variance 0.
    total_B = self.count_B + 1.0
    delta_B = discounted_B - self.mean_B
    mean_B = self.mean_B + delta_B / total_B
    var_B = (self.var_B * self.count_B + delta_B**2 * self.count_B / total_B) / total_B
    new = RewardNormaliser(discounted_B, mean_B, var_B, total_B)
    return reward_B / jnp.sqrt(var_B + epsilon), new


# --- Frames for evaluation gifs ------------------------------------------------


def _render_classic(env_id: str, state: Any, size: int = 160) -> np.ndarray:
  """A simple line drawing of the true (unmasked) state."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  image = Image.new('RGB', (size, size), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  if env_id == 'CartPole-v1':
    scale = size / 4.8  # the track spans x in [-2.4, 2.4]
    cart_x, cart_y = size / 2 + float(state.x) * scale, size * 0.7
    draw.line([(0, cart_y + 8), (size, cart_y + 8)], fill=(0, 0, 0))
    draw.rectangle([cart_x - 15, cart_y - 8, cart_x + 15, cart_y + 8], fill=(40, 40, 40))
    pole = 1.0 * scale  # the pole is 2 * length = 1.0 long
    tip = (cart_x + pole * np.sin(float(state.theta)), cart_y - pole * np.cos(float(state.theta)))
    draw.line([(cart_x, cart_y), tip], fill=(202, 152, 101), width=5)
  else:
    scale, centre = size / 5.0, (size / 2, size / 2)
    a1, a2 = float(state.joint_angle1), float(state.joint_angle2)
    p1 = (centre[0] + scale * np.sin(a1), centre[1] + scale * np.cos(a1))
    p2 = (p1[0] + scale * np.sin(a1 + a2), p1[1] + scale * np.cos(a1 + a2))
    draw.line([(0, centre[1] - scale), (size, centre[1] - scale)], fill=(0, 0, 0))  # the goal height
    draw.line([centre, p1], fill=(0, 204, 204), width=5)
    draw.line([p1, p2], fill=(0, 204, 204), width=5)
  return np.asarray(image, np.uint8)
