"""The optax side of the trainer: LR schedules, gradient clipping, AdamW.

Matches the reference's training scripts (tasks/*/train.py, utils/schedulers.py):

  grads -> clip (quantile per tensor, or global norm) -> AdamW(schedule, decay mask)

LR convention. The reference reads the LR at the top of iteration k, steps the
optimizer, then calls scheduler.step(); so the update applied at step k (0-based,
k = updates already applied = optax's internal count = TrainState.step) uses
schedule(k). Every schedule here is that function of k. `make_optimizer` builds
the schedule from the config itself; the trainer logs the same values with
`current_lr(make_schedule(config), step)`.

The decay clamp [0, 15] is not an optax transformation: it is a projection of
the params after `optax.apply_updates` (models.ctm.project_decay_params).
"""

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], jax.Array]

# torch.nn.utils.clip_grad_norm_ divides max_norm by (norm + this).
_TORCH_CLIP_EPS = 1e-6


# ----------------------------------------------------------------------------
# Learning-rate schedules (step -> lr)
# ----------------------------------------------------------------------------


def warmup(lr: float, warmup_steps: int) -> Schedule:
  """The reference's `warmup` LambdaLR (used when use_scheduler is False).

  lr * k / warmup_steps for k < warmup_steps, then lr. Step 0 has LR 0 when
  warmup_steps > 0; warmup_steps = 0 means a constant lr.
  """

  def schedule(step):
    step_f = jnp.asarray(step, jnp.float32)
    if warmup_steps <= 0:
      return jnp.full_like(step_f, lr)
    return jnp.where(step_f < warmup_steps, lr * step_f / warmup_steps, lr)

  return schedule


def warmup_cosine(
    lr: float,
    warmup_steps: int,
    total_steps: int,
    warmup_start_lr: float = 1e-20,
    eta_min: float = 1e-7,
) -> Schedule:
  """Closed form of the reference's recursive WarmupCosineAnnealingLR.

  With W = warmup_steps, S = total_steps:
    k = 0:       warmup_start_lr
    0 < k < W:   linear, reaching lr at k = W - 1 (the ramp divides by W - 1)
    k >= W:      eta_min + (anchor - eta_min) * (1 + cos(pi (k - W) / (S - W))) / 2
  where anchor = lr, except anchor = warmup_start_lr for k <= S when W = 0 (the
  reference then anneals from its step-0 value, so its LR stays below eta_min
  until S). The reference's per-step ratio telescopes to this form. At k = S + 1
  (a zero denominator) it adds (lr - eta_min) (1 - cos(pi / (S - W))) / 2 to eta_min
  instead, which re-enters the same cosine from lr: past S the LR climbs back up,
  periodic with period 2 (S - W).
  """
  if total_steps <= warmup_steps:
    # The reference divides by S - W.
    raise ValueError(f'total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})')
  anchor = lr if warmup_steps > 0 else warmup_start_lr
  ramp_slope = (lr - warmup_start_lr) / max(warmup_steps - 1, 1)

  def schedule(step):
    step_i = jnp.asarray(step, jnp.int32)
    ramp = warmup_start_lr + step_i.astype(jnp.float32) * ramp_slope
    # (1 + cos(pi x)) / 2 = sin(pi (x - 1) / 2)^2; reducing x - 1 to [-1, 1) in integers
    # keeps float32 accurate (relative) near the troughs and far past the end.
    span = total_steps - warmup_steps
    offset = jnp.mod(step_i - warmup_steps, 2 * span) - span
    shape = jnp.sin(0.5 * math.pi * offset.astype(jnp.float32) / span) ** 2
    # Past S the reference re-enters its cosine from lr, whatever the anchor.
    peak = jnp.where(step_i > total_steps, lr, anchor)
    cosine = eta_min + (peak - eta_min) * shape
    return jnp.where(step_i < warmup_steps, ramp, cosine)

  return schedule


def warmup_multistep(
    lr: float, warmup_steps: int, milestones: Sequence[int], gamma: float
) -> Schedule:
  """The reference's WarmupMultiStepLR (SequentialLR of the warmup LambdaLR and a
  MultiStepLR on milestones shifted by warmup_steps).

  lr * k / W for k < W, then lr * gamma ** #{m in milestones : m <= k}
  (repeated milestones count repeatedly, milestones <= W apply from k = W).
  Checked against torch 2.13's SequentialLR, including W = 0.
  """
  milestones_K = jnp.asarray(sorted(milestones), jnp.int32).reshape(-1)
  ramp = warmup(lr, warmup_steps)

  def schedule(step):
    step_i = jnp.asarray(step, jnp.int32)
    n_decays = jnp.sum(milestones_K <= step_i[..., None], axis=-1)
    decayed = lr * jnp.power(jnp.float32(gamma), n_decays)
    return jnp.where(step_i < warmup_steps, ramp(step_i), decayed).astype(jnp.float32)

  return schedule


def make_schedule(config) -> Schedule:
  """The schedule the reference builds from its argparse names: `lr`,
  `warmup_steps`, `training_iterations`, `use_scheduler`, `scheduler_type`
  ('cosine' | 'multistep'), `milestones`, `gamma`."""
  if not config.use_scheduler:
    return warmup(config.lr, config.warmup_steps)
  if config.scheduler_type == 'cosine':
    return warmup_cosine(config.lr, config.warmup_steps, config.training_iterations)
  if config.scheduler_type == 'multistep':
    return warmup_multistep(config.lr, config.warmup_steps, config.milestones, config.gamma)
  raise ValueError(
      f"scheduler_type {config.scheduler_type!r} is unknown; expected 'cosine' or 'multistep'"
  )


def current_lr(schedule: Schedule, step) -> jax.Array:
  """The LR of the update that takes the state from `step` to `step + 1`, i.e.
  what the reference logs as optimizer.param_groups[-1]['lr'] at iteration `step`."""
  return schedule(step)


# ----------------------------------------------------------------------------
# Gradient clipping
# ----------------------------------------------------------------------------


def _l2_norm(g) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))


def _scale(g, coef):
  return (g * coef).astype(g.dtype)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_ (the image and maze scripts): scale all
  gradients by min(1, max_norm / (global_norm + 1e-6)). optax.clip_by_global_norm
  differs only by the 1e-6."""

  def clip(updates, params=None):
    del params
    coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + _TORCH_CLIP_EPS))
    return jax.tree.map(lambda g: _scale(g, coef), updates)

  return optax.stateless(clip)


class QuantileClipState(NamedTuple):
  count: jax.Array  # int32 []: updates seen so far
  history: Any  # like params, each leaf float32 [history_length]: a ring buffer of norms


def _history_quantile(history_H, n_valid, quantile):
  """torch.quantile(history[:n_valid], quantile) ('linear' interpolation) of the
  first n_valid entries; the rest are padding. Order does not matter, so the ring
  buffer's rotation does not either."""
  (history_length,) = history_H.shape
  valid_H = jnp.arange(history_length) < n_valid
  # Padding sorts to the end, so the valid entries are sorted_H[:n_valid].
  sorted_H = jnp.sort(jnp.where(valid_H, history_H, jnp.inf))
  rank = quantile * (jnp.maximum(n_valid, 1) - 1).astype(jnp.float32)
  below = jnp.floor(rank).astype(jnp.int32)
  above = jnp.ceil(rank).astype(jnp.int32)
  lo, hi = sorted_H[below], sorted_H[above]
  return lo + (rank - below) * (hi - lo)


def quantile_clip(quantile: float, history_length: int = 1000) -> optax.GradientTransformation:
  """autoclip's QuantileClip (per-tensor, global_threshold=False), as the parity
  script wraps its optimizer with it.

  For each tensor, on each update:
    threshold = inf on the first update, else the `quantile` of the norms of the
                previous (at most history_length) updates of that tensor, with
                torch.quantile's linear interpolation; the current norm is not in it;
    g *= min(1, threshold / (|g| + 1e-6))   (torch's clip_grad_norm_ on one tensor);
    the pre-clip |g| is then added to the history, dropping the oldest past
                history_length.
  One difference: torch skips tensors whose grad is None (unused that step);
  here every tensor has a gradient, so an unused tensor records a norm of 0.
  """
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f'quantile ({quantile}) must lie in [0, 1]')
  if history_length <= 0:
    raise ValueError(f'history_length ({history_length}) must be positive')

  def init_fn(params):
    return QuantileClipState(
        count=jnp.zeros((), jnp.int32),
        history=jax.tree.map(lambda _: jnp.zeros((history_length,), jnp.float32), params),
    )

  def update_fn(updates, state, params=None):
    del params
    n_valid = jnp.minimum(state.count, history_length)
    slot = state.count % history_length

    def clip_one(g, history_H):
      norm = _l2_norm(g)
      threshold = jnp.where(
          state.count == 0, jnp.inf, _history_quantile(history_H, n_valid, quantile)
      )
      coef = jnp.minimum(1.0, threshold / (norm + _TORCH_CLIP_EPS))
      return _scale(g, coef), history_H.at[slot].set(norm)

    leaves, treedef = jax.tree.flatten(updates)
    history_leaves = treedef.flatten_up_to(state.history)
    clipped, histories = zip(*map(clip_one, leaves, history_leaves)) if leaves else ((), ())
    new_state = QuantileClipState(
        count=optax.safe_int32_increment(state.count),
        history=treedef.unflatten(histories),
    )
    return treedef.unflatten(clipped), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------


def param_path(path) -> str:
  """'/'-joined key path of a leaf, e.g. 'synapses/Dense_0/bias'."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def weight_decay_mask(exclude: Sequence[str]) -> Callable[[Any], Any]:
  """params -> bool tree: True where weight decay applies. A leaf is excluded when
  any substring in `exclude` occurs in its path (the reference's
  weight_decay_exclusion_list, matched against '.'-joined torch names). Paths are
  relative to the tree handed to the optimizer (the 'params' collection)."""
  exclude = tuple(exclude)

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(s in param_path(path) for s in exclude), params
    )

  return mask


def make_optimizer(config, schedule: Schedule | None = None) -> optax.GradientTransformation:
  """clip -> AdamW, as the reference's training scripts.

  Config (reference names): `lr`, `weight_decay`, `gradient_clipping` (-1
  disables), and the schedule's fields (see make_schedule). Beyond the reference:
  `gradient_clipping_type` ('quantile': the parity script's QuantileClip with
  quantile = gradient_clipping; 'norm': the image/maze scripts' clip_grad_norm_
  with max_norm = gradient_clipping) and `weight_decay_exclude` (path substrings
  that get no decay; default none).

  AdamW is torch's: b1 0.9, b2 0.999, eps 1e-8 outside the square root,
  decoupled decay p -= lr * weight_decay * p with the step's lr. optax adds
  weight_decay * p to the Adam direction before scaling by -lr, which is the same
  update (torch decays p before the Adam step, but that step does not read p).
  """
  schedule = schedule or make_schedule(config)
  clip_value = config.gradient_clipping
  clip_type = getattr(config, 'gradient_clipping_type', 'quantile')
  exclude = tuple(getattr(config, 'weight_decay_exclude', ()))

  parts = []
  if clip_value != -1:
    if clip_type == 'quantile':
      parts.append(quantile_clip(clip_value, history_length=1000))
    elif clip_type == 'norm':
      parts.append(clip_by_global_norm(clip_value))
    else:
      raise ValueError(
          f"gradient_clipping_type {clip_type!r} is unknown; expected 'quantile' or 'norm'"
      )
  parts.append(
      optax.adamw(
          learning_rate=schedule,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=config.weight_decay,
          mask=weight_decay_mask(exclude) if exclude else None,
      )
  )
  return optax.chain(*parts)
