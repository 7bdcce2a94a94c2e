"""PPO on device (ctm_jax/tasks/rl/ppo.py), the JAX environments against
gymnasium's, and the RL loop: trains, checkpoints, resumes bit for bit."""

import json
import shutil

import chex
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import needs_8_devices
from ctm_jax import train
from ctm_jax import validation
from ctm_jax.configs import rl as rl_configs
from ctm_jax.data import envs as envs_lib
from ctm_jax.models import agent as agent_lib
from ctm_jax.tasks.rl import ppo


def _hyper(**overrides):
  values = dict(
      norm_adv=True, clip_coef=0.2, clip_vloss=False, ent_coef=0.01, vf_coef=0.5,
      discount_gamma=0.99, gae_lambda=0.95,
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


# --- GAE and the PPO loss against brute force ------------------------------------


def _numpy_gae(reward, value, done, next_value, next_done, gamma, lam):
  """tasks/rl/train.py's backward loop, in float64."""
  steps = reward.shape[0]
  advantages = np.zeros_like(reward, np.float64)
  last = 0.0
  for t in reversed(range(steps)):
    if t == steps - 1:
      nonterminal, next_values = 1.0 - next_done, next_value
    else:
      nonterminal, next_values = 1.0 - done[t + 1], value[t + 1]
    delta = reward[t] + gamma * next_values * nonterminal - value[t]
    advantages[t] = last = delta + gamma * lam * nonterminal * last
  return advantages, advantages + value


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_gae_matches_the_reference_loop(seed):
  rng = np.random.default_rng(seed)
  steps, envs = 17, 5
  reward = rng.normal(size=(steps, envs)).astype(np.float32)
  value = rng.normal(size=(steps, envs)).astype(np.float32)
  done = rng.random((steps, envs)) < 0.2
  next_value = rng.normal(size=envs).astype(np.float32)
  next_done = rng.random(envs) < 0.3
  advantage, returns = ppo.gae(
      jnp.asarray(reward), jnp.asarray(value), jnp.asarray(done), jnp.asarray(next_value),
      jnp.asarray(next_done), 0.97, 0.9,
  )
  want_adv, want_ret = _numpy_gae(
      reward, value, done.astype(np.float64), next_value, next_done.astype(np.float64), 0.97, 0.9
  )
  np.testing.assert_allclose(advantage, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, want_ret, rtol=1e-5, atol=1e-5)


def _numpy_ppo_loss(hyper, logits, values, batch):
  logits = logits.astype(np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
  new_logprob = np.take_along_axis(log_p, batch['action'][..., None], -1)[..., 0].reshape(-1)
  logratio = new_logprob - batch['logprob'].reshape(-1)
  ratio = np.exp(logratio)
  adv = batch['advantage'].reshape(-1).astype(np.float64)
  if hyper.norm_adv:
    adv = (adv - adv.mean()) / (adv.std(ddof=1) + 1e-8)
  pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - hyper.clip_coef, 1 + hyper.clip_coef)).mean()
  new_v, ret, old_v = values.reshape(-1), batch['return'].reshape(-1), batch['value'].reshape(-1)
  if hyper.clip_vloss:
    clipped = old_v + np.clip(new_v - old_v, -hyper.clip_coef, hyper.clip_coef)
    v = 0.5 * np.maximum((new_v - ret) ** 2, (clipped - ret) ** 2).mean()
  else:
    v = 0.5 * ((new_v - ret) ** 2).mean()
  entropy = -(np.exp(log_p) * log_p).sum(-1).mean()
  return pg - hyper.ent_coef * entropy + hyper.vf_coef * v, pg, v, entropy


@pytest.mark.parametrize('clip_vloss', [False, True])
@pytest.mark.parametrize('norm_adv', [False, True])
def test_ppo_loss_matches_brute_force(clip_vloss, norm_adv):
  rng = np.random.default_rng(3)
  steps, envs, actions = 6, 4, 3
  hyper = _hyper(clip_vloss=clip_vloss, norm_adv=norm_adv, clip_coef=0.1)
  logits = rng.normal(size=(steps, envs, actions)).astype(np.float32)
  values = rng.normal(size=(steps, envs)).astype(np.float32)
  batch = {
      'action': rng.integers(0, actions, (steps, envs)),
      # Old log-probabilities near the new ones, so some ratios fall inside the clip and some out.
      'logprob': (np.log(np.full((steps, envs), 1 / actions)) + rng.normal(0, 0.2, (steps, envs))).astype(np.float32),
      'advantage': rng.normal(size=(steps, envs)).astype(np.float32),
      'return': rng.normal(size=(steps, envs)).astype(np.float32),
      'value': (values + rng.normal(0, 0.3, (steps, envs))).astype(np.float32),
  }
  loss, metrics = ppo.ppo_loss(hyper, jnp.asarray(logits), jnp.asarray(values), jax.tree.map(jnp.asarray, batch))
  want, pg, v, entropy = _numpy_ppo_loss(hyper, logits, values, batch)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics['policy_loss']), pg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics['value_loss']), v, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics['entropy']), entropy, rtol=1e-5, atol=1e-6)


def test_reward_normaliser_matches_gymnasium():
  gym = pytest.importorskip('gymnasium')
  from gymnasium.wrappers import NormalizeReward  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  rewards = rng.normal(1.0, 2.0, 60)
  terminated = rng.random(60) < 0.1

  class Scripted(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (1,))
    action_space = gym.spaces.Discrete(1)

    def __init__(self):
      self.t = 0

    def reset(self, seed=None, options=None):
      return np.zeros(1, np.float32), {}

    def step(self, action):
      self.t += 1
      return np.zeros(1, np.float32), float(rewards[self.t - 1]), bool(terminated[self.t - 1]), False, {}

  env = NormalizeReward(Scripted(), gamma=0.99, epsilon=1e-8)
  env.reset()
  want = [env.step(0)[1] for _ in range(60)]
  normaliser = envs_lib.RewardNormaliser.create(1)
  got = []
  for r, d in zip(rewards, terminated):
    out, normaliser = normaliser(jnp.asarray([r], jnp.float32), jnp.asarray([d]), 0.99)
    got.append(float(out[0]))
  np.testing.assert_allclose(got, want, rtol=2e-4)


# --- The carried state ------------------------------------------------------------


def _agent(model_type='ctm', continuous=True):
  if model_type == 'ctm':
    agent = agent_lib.CTMAgent(
        2, 16, 8, 4, 1, 4, True, 2, False, 'classic-control-backbone', num_actions=2,
        continuous_state_trace=continuous,
    )
  else:
    agent = agent_lib.LSTMAgent(2, 16, 8, 'classic-control-backbone', num_actions=2)
  params = agent.init(jax.random.key(0), *agent.example_inputs((4,), jnp.float32))['params']
  return agent, params


@pytest.mark.parametrize('model_type', ['ctm', 'lstm'])
def test_carried_state_resets_exactly_where_episodes_end(model_type):
  """Replaying a rollout: a step after an episode's end gives what a fresh
  agent gives on that observation; any other step carries state (differs)."""
  agent, params = _agent(model_type)
  steps, envs = 9, 3
  obs = jax.random.normal(jax.random.key(1), (steps, envs, 4))
  done = np.zeros((steps, envs), bool)
  done[0] = True
  done[4, 0] = done[6, 1] = done[2, 2] = True
  carry0 = jax.tree.map(lambda x: x + 0.3, agent.apply({'params': params}, envs, method='initial_carry'))
  logits, values = ppo.replay(agent, params, carry0, obs, jnp.asarray(done), jax.random.key(2))
  fresh_carry = agent.apply({'params': params}, envs, method='initial_carry')
  apply = jax.jit(agent.apply)
  for t in range(steps):
    fresh_logits, fresh_values, _, _ = apply({'params': params}, obs[t], fresh_carry, jnp.zeros((envs,), bool))
    for b in range(envs):
      same = np.allclose(values[t, b], fresh_values[b], rtol=0, atol=1e-6) and np.allclose(
          logits[t, b], fresh_logits[b], rtol=0, atol=1e-6
      )
      assert same == bool(done[t, b]), (t, b)


REPLAY_AGENTS = {
    'ctm': lambda: agent_lib.CTMAgent(
        2, 16, 8, 4, 1, 4, True, 2, False, 'classic-control-backbone', num_actions=2),
    'ctm_not_continuous': lambda: agent_lib.CTMAgent(
        3, 16, 8, 4, 1, 4, True, 2, False, 'classic-control-backbone', num_actions=2,
        continuous_state_trace=False),
    # A U-Net synapse (features enter every tick), shallow NLMs with LayerNorm.
    'ctm_unet_norm': lambda: agent_lib.CTMAgent(
        2, 16, 8, 6, 2, 3, False, 2, True, 'classic-control-backbone', num_actions=3),
    'ctm_navigation': lambda: agent_lib.CTMAgent(
        2, 16, 4, 4, 1, 3, True, 2, False, 'navigation-backbone', num_actions=7),
    'lstm': lambda: agent_lib.LSTMAgent(2, 16, 8, 'classic-control-backbone', num_actions=2),
}


@pytest.mark.parametrize('name', sorted(REPLAY_AGENTS))
def test_the_replay_equals_the_agent_step_by_step_with_its_gradients(name):
  """PPO's replay (`agent.replay`: backbone, synapse projection, synch and
  heads over all steps at once) against `agent.apply` scanned step by step,
  with resets: outputs and every parameter's gradient."""
  agent = REPLAY_AGENTS[name]()
  navigation = agent.backbone_type == 'navigation-backbone'
  shape, dtype = ((7, 7, 3), jnp.int32) if navigation else ((4,), jnp.float32)
  key = jax.random.key(3)
  params = agent.init(key, *agent.example_inputs(shape, dtype))['params']
  params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(key, p.shape), params)
  steps, envs = 6, 3
  if navigation:
    obs = jax.random.randint(key, (steps, envs, *shape), 0, 3)
  else:
    obs = jax.random.normal(key, (steps, envs, *shape))
  done = np.zeros((steps, envs), bool)
  done[2, 0] = done[3, 1] = done[5, 0] = True
  done = jnp.asarray(done)
  carry0 = jax.tree.map(lambda x: x + 0.3, agent.apply({'params': params}, envs, method='initial_carry'))

  def stepwise(p):
    def step(carry, xs):
      logits, value, carry, _ = agent.apply({'params': p}, xs[0], carry, xs[1])
      return carry, (logits, value)

    return jax.lax.scan(step, carry0, (obs, done))[1]

  def replayed(p):
    return ppo.replay(agent, p, carry0, obs, done, jax.random.key(0))

  def loss(fn):
    return lambda p: sum(jnp.sum(jnp.sin(3 * x)) for x in fn(p))

  for want, got in zip(jax.jit(stepwise)(params), jax.jit(replayed)(params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  want_grads = jax.jit(jax.grad(loss(stepwise)))(params)
  got_grads = jax.jit(jax.grad(loss(replayed)))(params)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(got_grads)):
    scale = max(float(jnp.abs(want).max()), 1e-6)
    assert float(jnp.abs(got - want).max()) <= 1e-5 * scale + 1e-7, jax.tree_util.keystr(path)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got_grads))


def _autodiff_window_synchronisation(z_MxNxX, decay_P):
  """The formula by gathered pairs, differentiated by JAX."""
  memory, n, _ = z_MxNxX.shape
  left, right = np.triu_indices(n)
  age_M = jnp.arange(memory - 1, -1, -1, dtype=jnp.float32)
  weight_MxP = jnp.exp(-age_M[:, None] * decay_P[None, :])
  products_MxPxX = z_MxNxX[:, left] * z_MxNxX[:, right]
  return jnp.einsum('mpx,mp->xp', products_MxPxX, weight_MxP) / jnp.sqrt(weight_MxP.sum(0))


@pytest.mark.parametrize('memory, n, windows', [(20, 16, 37), (5, 3, 11), (1, 1, 4), (7, 6, 1)])
def test_window_synchronisation_and_its_written_out_gradient_equal_autodiff(memory, n, windows):
  keys = jax.random.split(jax.random.key(memory * 100 + n), 3)
  z = jax.random.normal(keys[0], (memory, n, windows))
  decay = jax.random.uniform(keys[1], (n * (n + 1) // 2,), maxval=4.0).at[0].set(0.0)
  probe = jax.random.normal(keys[2], (windows, n * (n + 1) // 2))

  def loss(fn):
    return lambda z, d: jnp.sum(jnp.sin(fn(z, d)) * probe)

  want = _autodiff_window_synchronisation(z, decay)
  got = jax.jit(agent_lib.window_synchronisation)(z, decay)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  want_grads = jax.grad(loss(_autodiff_window_synchronisation), argnums=(0, 1))(z, decay)
  got_grads = jax.jit(jax.grad(loss(agent_lib.window_synchronisation), argnums=(0, 1)))(z, decay)
  for name, want_g, got_g in zip(('z', 'decay'), want_grads, got_grads):
    scale = float(jnp.abs(want_g).max())
    assert scale > 0 or (name == 'decay' and memory == 1), name  # one step: no age, no decay gradient
    assert float(jnp.abs(got_g - want_g).max()) <= 1e-5 * scale, name


@pytest.mark.slow  # a replay compile; the reset path is the same as above
def test_without_a_continuous_trace_the_ctm_restarts_every_step():
  agent, params = _agent('ctm', continuous=False)
  obs = jax.random.normal(jax.random.key(1), (5, 2, 4))
  carry0 = agent.apply({'params': params}, 2, method='initial_carry')
  _, values = ppo.replay(agent, params, carry0, obs, jnp.zeros((5, 2), bool), jax.random.key(2))
  apply = jax.jit(agent.apply)
  for t in range(5):
    _, fresh, _, _ = apply({'params': params}, obs[t], carry0, jnp.zeros((2,), bool))
    np.testing.assert_allclose(values[t], fresh, atol=1e-6)


def test_rollout_log_probabilities_replay_to_ratio_one():
  """The update's replay from the rollout's starting carry reproduces the
  rollout's own log-probabilities and values (so the first ratio is 1)."""
  config = rl_configs.get_config('smoke')
  config.num_steps = 45  # past the 20-step time limit: episodes end inside the rollout
  env = envs_lib.make(config.env_id, config.max_environment_steps, config.mask_velocity)
  agent, _ = _agent()
  tx = ppo.make_optimizer(config)
  runner = ppo.init_runner(config, agent, env, tx, jax.random.key(0))
  carry0 = runner.carry
  _, rollout, _ = jax.jit(lambda r: ppo.rollout(config, agent, env, r, jax.random.key(5)))(runner)
  logits, values = ppo.replay(agent, runner.params, carry0, rollout.obs, rollout.done, jax.random.key(0))
  logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), rollout.action[..., None], -1)[..., 0]
  np.testing.assert_allclose(logprob, rollout.logprob, atol=1e-5)
  np.testing.assert_allclose(values, rollout.value, atol=1e-5)
  assert bool(rollout.done[1:].any(0).all())  # every environment's episode ended


# --- Environments against gymnasium ---------------------------------------------


def _gymnax_state(env_id, gym_state):
  from gymnax.environments.classic_control import acrobot, cartpole  # pylint: disable=g-import-not-at-top

  s = [jnp.float32(v) for v in gym_state]
  if env_id == 'CartPole-v1':
    return cartpole.EnvState(x=s[0], x_dot=s[1], theta=s[2], theta_dot=s[3], time=0)
  return acrobot.EnvState(joint_angle1=s[0], joint_angle2=s[1], velocity_1=s[2], velocity_2=s[3], time=jnp.int32(0))


@pytest.mark.parametrize('env_id', ['CartPole-v1', 'Acrobot-v1'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_classic_control_matches_gymnasium(env_id, seed):
  """From gymnasium's reset state, the same actions give the same masked
  observations, rewards and termination step by step (gymnasium integrates in
  float64, gymnax in float32: observations agree to 1e-4 over an episode)."""
  gym = pytest.importorskip('gymnasium')
  limit = 200 if env_id == 'CartPole-v1' else 100
  reference = gym.make(env_id, max_episode_steps=limit)
  gym_obs, _ = reference.reset(seed=seed)
  env = envs_lib.make(env_id, limit, mask_velocity=True)
  state = _gymnax_state(env_id, reference.unwrapped.state)
  mask = np.asarray(envs_lib.CLASSIC_CONTROL[env_id], np.float32)
  step = jax.jit(env.step)
  rng = np.random.default_rng(seed)
  for t in range(limit):
    action = int(rng.integers(env.num_actions))
    gym_obs, gym_reward, gym_terminated, gym_truncated, _ = reference.step(action)
    state, obs, reward, terminated = step(jax.random.key(t), state, action)
    np.testing.assert_allclose(obs, gym_obs * mask, atol=1e-4, err_msg=f'step {t}')
    assert float(reward) == gym_reward, t
    assert bool(terminated) == gym_terminated, t
    assert bool(env.truncated(state)) == (gym_truncated and not gym_terminated), t
    if gym_terminated or gym_truncated:
      break
  reference.close()


def test_env_ids_and_masks_are_the_reference_ones():
  cartpole = envs_lib.make('CartPole-v1', 200)
  assert cartpole.num_actions == 2 and cartpole.observation_shape == (4,)
  state, obs = cartpole.reset(jax.random.key(0))
  assert obs[1] == 0 and obs[3] == 0 and obs[0] != 0
  acrobot = envs_lib.make('Acrobot-v1', 500, mask_velocity=False)
  assert acrobot.num_actions == 3 and acrobot.observation_shape == (6,)
  _, obs = acrobot.reset(jax.random.key(0))
  assert np.all(np.asarray(obs)[4:] != 0)
  with pytest.raises(ValueError, match="env_id='Pong-v0'"):
    envs_lib.make('Pong-v0', 10)
  assert cartpole.render(state).dtype == np.uint8


# --- Configs and the loop ------------------------------------------------------------


def test_every_variant_validates():
  for variant in rl_configs.VARIANTS:
    validation.validate(rl_configs.get_config(variant), num_devices=1)


def test_script_variants_are_the_reference_scripts():
  config = rl_configs.get_config('cartpole_ctm_2')
  assert (config.model.d_model, config.model.d_input, config.model.memory_length) == (128, 128, 20)
  assert (config.num_envs, config.num_steps, config.update_epochs, config.lr) == (256, 100, 4, 1e-3)
  assert (config.max_environment_steps, config.total_timesteps) == (200, 10_000_000)
  assert rl_configs.get_config('cartpole_lstm_5').update_epochs == 1
  config = rl_configs.get_config('4rooms_lstm_2')
  assert (config.model_type, config.model.d_model, config.env_id) == ('lstm', 300, 'MiniGrid-FourRooms-v0')
  assert (config.num_envs, config.num_steps, config.lr, config.max_environment_steps) == (256, 50, 1e-4, 300)
  config = rl_configs.get_config('acrobot_ctm_5')
  assert (config.model.d_model, config.model.memory_length, config.num_envs) == (256, 25, 12)


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('env_id', 'Pong-v0', 'expected one of CartPole-v1'),
        ('num_minibatches', 3, 'must divide num_envs=16'),
        ('discount_gamma', 1.5, r'\[0.0, 1.0\]'),
        ('total_timesteps', 10, 'below one rollout'),
    ],
)
def test_bad_fields_are_named(field, value, message):
  config = rl_configs.get_config('smoke')
  config[field] = value
  with pytest.raises(ValueError, match=f'config.{field}=.*{message}'):
    validation.validate(config, num_devices=1)


@pytest.mark.slow  # two short PPO runs each
@needs_8_devices
@pytest.mark.parametrize('variant', ['smoke', 'lstm_smoke', '4rooms_smoke'])
def test_smoke_trains_evaluates_and_resumes_bit_identically_on_the_mesh(variant, tmp_path):
  flags.FLAGS.mark_as_parsed()
  config = rl_configs.get_config(variant)
  config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 2, 2, 2
  total = ppo.iterations(config)
  workdir = tmp_path / 'run'
  uninterrupted = train.train_and_evaluate(config, str(workdir))
  assert int(uninterrupted.step) == total
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'eval/return' in r] == [2, total]
  assert all(np.isfinite(r['train/loss']) for r in records if 'train/loss' in r)
  assert any(r.get('episodes/count', 0) > 0 for r in records)
  assert (workdir / 'plots' / 'episode_2_0.gif').exists()
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / str(total))  # back to iteration 2
  resumed = train.train_and_evaluate(config, str(resumed_dir))
  assert int(resumed.step) == total
  chex.assert_trees_all_equal(resumed, uninterrupted)


def test_supervised_tools_refuse_an_rl_run_in_one_line(tmp_path):
  """evaluate / predict / export read held-out inputs an RL run does not have."""
  from ctm_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from ctm_jax import inference  # pylint: disable=g-import-not-at-top

  config = rl_configs.get_config('smoke')
  checkpoint_lib.write_config(str(tmp_path), config)
  with pytest.raises(validation.UsageError, match="a 'rl' run, which has no held-out inputs"):
    inference.load(str(tmp_path))
