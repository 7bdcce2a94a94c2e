"""PPO with a recurrent agent, entirely on device: the reference's
tasks/rl/train.py (CleanRL's recurrent PPO) as one jitted training iteration.

One iteration: `num_steps` steps of `num_envs` environments in a `lax.scan`
(the agent's carried state reset where an episode ended, actions sampled,
environments auto-reset, rewards normalised as gymnasium's NormalizeReward),
GAE (rlax), then `update_epochs` epochs over `num_minibatches` groups of
environments, each replaying its rollout from the state it started with:
clipped surrogate (rlax), value loss (optionally clipped), entropy bonus,
global-norm clipping and Adam (optax), the learning rate annealed per iteration.

Where this differs from the reference, by design:
* Auto-reset happens in the step that ends an episode (the next observation
  is the new episode's first). gymnasium >= 1.0's vector envs reset one step
  later, so the reference's rollouts also hold one extra transition per
  episode (the final observation, an ignored action, reward 0).
* Minibatch m holds environments m, m + n, m + 2n, ... (n = num_minibatches)
  rather than a contiguous block, so that each minibatch spans every device
  of the mesh; the reference does not shuffle either, and its environments
  are exchangeable.

Dimension glossary: T rollout steps, B environments, A actions, b environments
of one minibatch.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ctm_jax import extras
from ctm_jax import sharding
from ctm_jax.data import envs as envs_lib
from ctm_jax.models import ctm


class Runner(flax.struct.PyTreeNode):
  """Everything a resumed run needs: the learner and the environments mid-episode."""

  step: jax.Array  # training iterations done
  params: Any
  opt_state: Any
  env_state: Any  # (B, ...) leaves
  obs: jax.Array  # (B, ...) the next observation
  done_B: jax.Array  # the episode before `obs` ended: reset the carry first
  carry: Any  # the agent's carried state, (B, ...) leaves
  normaliser: envs_lib.RewardNormaliser
  episode_return_B: jax.Array  # raw return of the running episode
  episode_length_B: jax.Array
  rng: jax.Array  # key data


class Rollout(flax.struct.PyTreeNode):
  """One iteration's transitions, (T, B, ...)."""

  obs: jax.Array
  done: jax.Array  # the carry was reset before this step
  action: jax.Array
  logprob: jax.Array
  value: jax.Array
  reward: jax.Array  # normalised


def steps_per_iteration(config) -> int:
  """Environment steps of one rollout: num_envs x num_steps."""
  return config.num_envs * config.num_steps


def iterations(config) -> int:
  """Training iterations: the reference's loop runs 0..total_timesteps // batch, inclusive."""
  return config.total_timesteps // steps_per_iteration(config) + 1


def learning_rate(config, iteration):
  """The reference's annealing: lr * (1 - (i - 1) / N) at iteration i of 0..N."""
  if not config.anneal_lr:
    return jnp.asarray(config.lr, jnp.float32)
  n = iterations(config) - 1
  return config.lr * (1.0 - (jnp.asarray(iteration, jnp.float32) - 1.0) / n)


def make_optimizer(config):
  """Global-norm clipping, then Adam (eps 1e-5) with the learning rate set per iteration."""
  return optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm),
      optax.inject_hyperparams(optax.adam)(learning_rate=config.lr, eps=1e-5),
  )


def set_learning_rate(opt_state, lr):
  clip_state, adam_state = opt_state
  hyperparams = dict(adam_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
  return clip_state, adam_state._replace(hyperparams=hyperparams)


def _batch_constrain(tree, axis=0):
  """Environments sharded over the mesh's batch axes, along `axis`."""

  def constrain(x):
    if x.ndim <= axis:
      return x
    spec = [None] * x.ndim
    spec[axis] = 'batch'
    return sharding.constrain(x, tuple(spec))

  return jax.tree.map(constrain, tree)


def init_runner(config, agent, env, tx, key) -> Runner:
  """A fresh learner and `num_envs` freshly reset environments."""
  init_key, env_key, state_key = jax.random.split(key, 3)
  params = agent.init(init_key, *agent.example_inputs(env.observation_shape, env.observation_dtype))['params']
  env_state, obs = jax.vmap(env.reset)(jax.random.split(env_key, config.num_envs))
  batch = config.num_envs
  return Runner(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      env_state=_batch_constrain(env_state),
      obs=_batch_constrain(obs),
      done_B=jnp.zeros((batch,), bool),
      carry=_batch_constrain(agent.apply({'params': params}, batch, method='initial_carry')),
      normaliser=envs_lib.RewardNormaliser.create(batch),
      episode_return_B=jnp.zeros((batch,), jnp.float32),
      episode_length_B=jnp.zeros((batch,), jnp.int32),
      rng=jax.random.key_data(state_key),
  )


def env_step(env, key, env_state, action_B):
  """Steps every environment, auto-resetting those whose episode ended.

  Returns (env_state, next_obs, raw reward, terminated, done)."""
  batch = action_B.shape[0]
  step_key, reset_key = jax.random.split(key)
  env_state, obs, reward_B, terminated_B = jax.vmap(env.step)(
      jax.random.split(step_key, batch), env_state, action_B
  )
  done_B = terminated_B | jax.vmap(env.truncated)(env_state)
  fresh_state, fresh_obs = jax.vmap(env.reset)(jax.random.split(reset_key, batch))
  env_state, obs = ctm.hold(done_B, (fresh_state, fresh_obs), (env_state, obs), 0)
  return env_state, obs, reward_B, terminated_B, done_B


def iteration_keys(runner: Runner):
  """(rollout, bootstrap value, update) keys of the runner's current iteration."""
  return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(runner.rng), runner.step), 3)


def rollout(config, agent, env, runner: Runner, key):
  """`num_steps` steps of every environment. Returns (runner, Rollout, episode sums)."""

  def step(carry, t):
    step_key = jax.random.fold_in(key, t)
    (env_state, obs, done_B, agent_carry, normaliser, ep_return_B, ep_length_B, sums) = carry
    action_key, env_key, dropout_key = jax.random.split(step_key, 3)
    logits_BxA, value_B, agent_carry, _ = agent.apply(
        {'params': runner.params}, obs, agent_carry, done_B, rngs={'dropout': dropout_key}
    )
    action_B = jax.random.categorical(action_key, logits_BxA)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxA), action_B[:, None], 1)[:, 0]
    env_state, next_obs, reward_B, terminated_B, next_done_B = env_step(
        env, env_key, env_state, action_B
    )
    normalised_B, normaliser = normaliser(reward_B, terminated_B, config.discount_gamma)
    ep_return_B = ep_return_B + reward_B
    ep_length_B = ep_length_B + 1
    ended = next_done_B.astype(jnp.float32)
    sums = {
        'episodes': sums['episodes'] + ended.sum(),
        'return': sums['return'] + (ended * ep_return_B).sum(),
        'length': sums['length'] + (ended * ep_length_B).sum(),
        # An episode that ended with a positive reward reached its goal (MiniGrid).
        'success': sums['success'] + (ended * (terminated_B & (reward_B > 0))).sum(),
    }
    ep_return_B = jnp.where(next_done_B, 0.0, ep_return_B)
    ep_length_B = jnp.where(next_done_B, 0, ep_length_B)
    transition = Rollout(obs, done_B, action_B, logprob_B, value_B, normalised_B)
    carry = (env_state, next_obs, next_done_B, agent_carry, normaliser, ep_return_B, ep_length_B, sums)
    return _batch_constrain(carry), _batch_constrain(transition)

  zero = jnp.zeros((), jnp.float32)
  init = (
      runner.env_state,
      runner.obs,
      runner.done_B,
      runner.carry,
      runner.normaliser,
      runner.episode_return_B,
      runner.episode_length_B,
      {'episodes': zero, 'return': zero, 'length': zero, 'success': zero},
  )
  final, transitions = jax.lax.scan(step, init, jnp.arange(config.num_steps))
  env_state, obs, done_B, agent_carry, normaliser, ep_return_B, ep_length_B, sums = final
  runner = runner.replace(
      env_state=env_state,
      obs=obs,
      done_B=done_B,
      carry=agent_carry,
      normaliser=normaliser,
      episode_return_B=ep_return_B,
      episode_length_B=ep_length_B,
  )
  return runner, transitions, sums


def gae(reward_TxB, value_TxB, done_TxB, next_value_B, next_done_B, gamma, gae_lambda):
  """(advantages, returns), (T, B): the reference's GAE, where `done_TxB[t]`
  means the episode ended before step t (no bootstrap across it)."""
  done_after_TxB = jnp.concatenate([done_TxB[1:], next_done_B[None]], 0)
  discount_TxB = gamma * (1.0 - done_after_TxB.astype(jnp.float32))
  values_T1xB = jnp.concatenate([value_TxB, next_value_B[None]], 0)
  rlax = extras.module('rlax', 'PPO')
  advantage_BxT = jax.vmap(
      lambda r, d, v: rlax.truncated_generalized_advantage_estimation(r, d, gae_lambda, v),
  )(reward_TxB.T, discount_TxB.T, values_T1xB.T)
  advantage_TxB = advantage_BxT.T
  return advantage_TxB, advantage_TxB + value_TxB


def replay(agent, params, carry0, obs_TxB, done_TxB, dropout_key):
  """The agent over a rollout from its starting carry: (logits (T, B, A), values (T, B)).

  The agent's `replay`: step by step what the rollout computed, arranged
  for the backward pass (backbone and heads over all steps at once)."""
  return agent.apply(
      {'params': params}, obs_TxB, carry0, done_TxB, rngs={'dropout': dropout_key}, method='replay'
  )


def ppo_loss(config, logits_TxBxA, value_TxB, batch):
  """(loss, metrics) of one minibatch: the reference's clipped surrogate,
  value loss and entropy bonus. `batch` holds action, logprob, advantage,
  return, value (T, b)."""
  log_p_TxBxA = jax.nn.log_softmax(logits_TxBxA)
  new_logprob = jnp.take_along_axis(log_p_TxBxA, batch['action'][..., None], -1)[..., 0]
  logratio = new_logprob - batch['logprob']
  ratio = jnp.exp(logratio)
  advantage = batch['advantage']
  if config.norm_adv:  # torch's std: unbiased
    advantage = (advantage - advantage.mean()) / (jnp.std(advantage, ddof=1) + 1e-8)
  rlax = extras.module('rlax', 'PPO')
  pg_loss = rlax.clipped_surrogate_pg_loss(ratio.reshape(-1), advantage.reshape(-1), config.clip_coef)
  returns = batch['return']
  if config.clip_vloss:
    clipped = batch['value'] + jnp.clip(value_TxB - batch['value'], -config.clip_coef, config.clip_coef)
    v_loss = 0.5 * jnp.maximum((value_TxB - returns) ** 2, (clipped - returns) ** 2).mean()
  else:
    v_loss = 0.5 * ((value_TxB - returns) ** 2).mean()
  entropy = -(jnp.exp(log_p_TxBxA) * log_p_TxBxA).sum(-1).mean()
  loss = pg_loss - config.ent_coef * entropy + config.vf_coef * v_loss
  metrics = {
      'policy_loss': pg_loss,
      'value_loss': v_loss,
      'entropy': entropy,
      'old_approx_kl': (-logratio).mean(),
      'approx_kl': ((ratio - 1) - logratio).mean(),
      'clipfrac': (jnp.abs(ratio - 1.0) > config.clip_coef).astype(jnp.float32).mean(),
  }
  return loss, metrics


def _minibatches(tree, n: int, axis: int):
  """(..., B, ...) -> (n, ..., B / n, ...): minibatch m holds environments m, m + n, ..."""

  def split(x):
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 1, axis + 1)

  return jax.tree.map(split, tree)


def make_iteration(config, agent, env, tx):
  """(runner) -> (runner, metrics): one rollout and its PPO updates."""
  n_mb = config.num_minibatches

  def iteration(runner: Runner):
    lr = learning_rate(config, runner.step)
    carry0 = runner.carry
    rollout_key, value_key, update_key = iteration_keys(runner)
    runner, rollout_data, sums = rollout(config, agent, env, runner, rollout_key)
    _, next_value_B, _, _ = agent.apply(
        {'params': runner.params}, runner.obs, runner.carry, runner.done_B,
        rngs={'dropout': value_key},
    )
    advantage_TxB, return_TxB = gae(
        rollout_data.reward, rollout_data.value, rollout_data.done, next_value_B, runner.done_B,
        config.discount_gamma, config.gae_lambda,
    )
    batch = {
        'obs': rollout_data.obs, 'done': rollout_data.done, 'action': rollout_data.action,
        'logprob': rollout_data.logprob, 'advantage': advantage_TxB, 'return': return_TxB,
        'value': rollout_data.value,
    }
    batches = _minibatches(batch, n_mb, axis=1)
    carries = _minibatches(carry0, n_mb, axis=0)
    opt_state = set_learning_rate(runner.opt_state, lr)

    def update(state, xs):
      params, opt_state, stopped, finite = state
      mb, mb_carry, key = xs
      # Each minibatch's environments stay spread over every device.
      mb, mb_carry = _batch_constrain(mb, axis=1), _batch_constrain(mb_carry)

      def loss_fn(p):
        logits, values = replay(agent, p, mb_carry, mb['obs'], mb['done'], key)
        return ppo_loss(config, logits, values, mb)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      grad_norm = optax.tree.norm(grads)
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      deltas, new_opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, deltas)
      keep = stopped | ~ok  # target_kl reached, or a blown-up step: no update
      params, opt_state = jax.tree.map(
          lambda old, new: jnp.where(keep, old, new), (params, opt_state), (new_params, new_opt_state)
      )
      metrics = dict(metrics, loss=loss, grad_norm=grad_norm, applied=(~keep).astype(jnp.float32))
      return (params, opt_state, stopped, finite & ok), metrics

    def epoch(state, epoch_index):
      keys = jax.random.split(jax.random.fold_in(update_key, epoch_index), n_mb)
      state, metrics = jax.lax.scan(update, state, (batches, carries, keys))
      params, opt_state, stopped, finite = state
      if config.target_kl is not None:  # the reference checks the last minibatch's KL
        stopped = stopped | (metrics['approx_kl'][-1] > config.target_kl)
      return (params, opt_state, stopped, finite), metrics

    init = (runner.params, opt_state, jnp.zeros((), bool), jnp.ones((), bool))
    (params, opt_state, _, finite), metrics = jax.lax.scan(
        epoch, init, jnp.arange(config.update_epochs)
    )
    applied = jnp.maximum(metrics['applied'].sum(), 1.0)
    means = {k: (v * metrics['applied']).sum() / applied for k, v in metrics.items() if k != 'applied'}
    values, returns = rollout_data.value.reshape(-1), return_TxB.reshape(-1)
    var_y = jnp.var(returns)
    explained = jnp.where(var_y == 0, jnp.nan, 1 - jnp.var(returns - values) / var_y)
    runner = runner.replace(step=runner.step + 1, params=params, opt_state=opt_state)
    out = {
        **{f'losses/{k}': v for k, v in means.items() if k not in ('loss', 'grad_norm')},
        'losses/explained_variance': explained,
        'train/loss': means['loss'],
        'train/grad_norm': means['grad_norm'],
        'train/lr': lr,
        'train/updates': metrics['applied'].sum(),
        'finite': finite,
        **{f'episodes/{k}': v for k, v in sums.items()},
    }
    return runner, out

  return iteration


def evaluate(config, agent, env, params, key, episodes: int, tracked: int = 0, greedy: bool = False):
  """`episodes` environments played from reset for `max_environment_steps`
  steps with sampled actions (as the reference's evaluation), or the most
  probable ones with `greedy`; each one's first episode counts. Returns (per-episode return / length / success (B,), and a
  per-step record (S, ..., tracked, ...) of the first `tracked` environments,
  or None)."""
  steps = config.max_environment_steps
  reset_key, run_key = jax.random.split(key)
  env_state, obs = jax.vmap(env.reset)(jax.random.split(reset_key, episodes))
  carry = agent.apply({'params': params}, episodes, method='initial_carry')

  def step(state, t):
    env_state, obs, carry, alive_B, ret_B, len_B, success_B = state
    key = jax.random.fold_in(run_key, t)
    action_key, env_key = jax.random.split(key)
    logits, value, carry, tracking = agent.apply(
        {'params': params}, obs, carry, jnp.zeros((episodes,), bool), track=tracked > 0
    )
    action = jnp.argmax(logits, -1) if greedy else jax.random.categorical(action_key, logits)
    new_env_state, new_obs, reward, terminated = jax.vmap(env.step)(
        jax.random.split(env_key, episodes), env_state, action
    )
    done = terminated | jax.vmap(env.truncated)(new_env_state)
    alive = alive_B.astype(jnp.float32)
    record = None
    if tracked:
      pick = lambda x: x[:tracked]  # pylint: disable=unnecessary-lambda-assignment
      record = {
          'env_state': jax.tree.map(pick, env_state),
          'alive': alive_B[:tracked],
          'action': action[:tracked],
          'probs': jax.nn.softmax(logits[:tracked]),
          'value': value[:tracked],
          'reward': reward[:tracked],
          'pre_activations': tracking['pre_activations'][:, :tracked],
          'post_activations': tracking['post_activations'][:, :tracked],
      }
    state = (
        new_env_state,
        new_obs,
        carry,
        alive_B & ~done,
        ret_B + alive * reward,
        len_B + alive,
        success_B + alive * (terminated & (reward > 0)),
    )
    return state, record

  zeros = jnp.zeros((episodes,), jnp.float32)
  init = (env_state, obs, carry, jnp.ones((episodes,), bool), zeros, zeros, zeros)
  final, record = jax.lax.scan(step, init, jnp.arange(steps))
  _, _, _, _, ret_B, len_B, success_B = final
  sums = {'return': ret_B, 'length': len_B, 'success': success_B}
  return sums, record

