"""Reinforcement learning with PPO (the reference's tasks/rl): the CTM or the
LSTM baseline as a recurrent agent, environments in JAX.

Variants (`--config=configs/rl.py:<variant>`), one per reference script in
tasks/rl/scripts/<env>/train_<model>_<ticks>.sh, key for key (seed 1, the
scripts' first run):
  cartpole_ctm_{1,2,5}, cartpole_lstm_{1,2,5}   CartPole-v1, velocities masked,
                                                200 steps, 256 envs x 100 steps, 10M steps
  acrobot_ctm_{1,2,5}, acrobot_lstm_{1,2,5}     Acrobot-v1, velocities masked,
                                                500 steps, 12 envs x 100 steps, 2M steps
  4rooms_ctm_{1,2}, 4rooms_lstm_{1,2}           MiniGrid-FourRooms-v0, 300 steps,
                                                256 envs x 50 steps, 300M steps
Small variants that learn on a laptop CPU (docs/results.md, "Reinforcement
learning"): smaller models, more environments per update than the scripts'
Acrobot, entropy bonus 0.01:
  cartpole_small  solves it; its eval returns over wall time are in
                  docs/results.md's CartPole table
  acrobot_small   eval return better than -100 in ~1.5 minutes
  4rooms_small    entropy bonus 0.01, 128 environments, 2 epochs: success
                  rises from the initial policy's ~10% to 72% (sampled
                  actions) in 29 minutes on one core
Tests: smoke (CartPole CTM), lstm_smoke, 4rooms_smoke.

The default is cartpole_ctm_2. Run:
  python -m ctm_jax.main --config=configs/rl.py:cartpole_small --workdir=runs/cartpole_small
"""

import ml_collections

from ctm_jax.configs import common
from ctm_jax import sharding

ENVS = {'cartpole': 'CartPole-v1', 'acrobot': 'Acrobot-v1', '4rooms': 'MiniGrid-FourRooms-v0'}
# (env, model type, ticks) -> the script's d_model and memory_length.
SCRIPTS = {
    ('cartpole', 'ctm', 1): (128, 10), ('cartpole', 'ctm', 2): (128, 20),
    ('cartpole', 'ctm', 5): (128, 50), ('cartpole', 'lstm', 1): (118, 10),
    ('cartpole', 'lstm', 2): (126, 20), ('cartpole', 'lstm', 5): (148, 50),
    ('acrobot', 'ctm', 1): (256, 5), ('acrobot', 'ctm', 2): (256, 10),
    ('acrobot', 'ctm', 5): (256, 25), ('acrobot', 'lstm', 1): (243, 5),
    ('acrobot', 'lstm', 2): (249, 5), ('acrobot', 'lstm', 5): (265, 5),
    ('4rooms', 'ctm', 1): (512, 10), ('4rooms', 'ctm', 2): (512, 20),
    ('4rooms', 'lstm', 1): (294, 10), ('4rooms', 'lstm', 2): (300, 20),
}
SCRIPT_VARIANTS = tuple(f'{env}_{model}_{ticks}' for env, model, ticks in SCRIPTS)
VARIANTS = ('cartpole_ctm_2',) + tuple(v for v in SCRIPT_VARIANTS if v != 'cartpole_ctm_2') + (
    'cartpole_small', 'acrobot_small', '4rooms_small', 'smoke', 'lstm_smoke', '4rooms_smoke',
)


def model(**options) -> ml_collections.ConfigDict:
  """Options of both recurrent models, under the reference's argument names;
  each model takes its own (the LSTM: iterations, d_model, d_input)."""
  defaults = dict(
      iterations=1, d_model=128, d_input=64, n_synch_out=16, synapse_depth=1, memory_length=5,
      deep_nlms=True, memory_hidden_dims=2, do_layernorm_nlm=False, dropout=0.0,
      neuron_select_type='first-last', dtype='float32',
      # The reference's --continuous_state_trace: carry the CTM's traces across
      # environment steps (the LSTM's state always is).
      continuous_state_trace=True,
  )
  defaults.update(options)
  return ml_collections.ConfigDict(defaults)


def base() -> ml_collections.ConfigDict:
  """tasks/rl/train.py's defaults."""
  return ml_collections.ConfigDict(
      dict(
          task='rl',
          model_type='ctm',
          model=model(),
          env_id='Acrobot-v1',
          mask_velocity=True,
          max_environment_steps=500,
          num_steps=100,
          total_timesteps=1_000_000,
          num_envs=8,
          anneal_lr=True,
          discount_gamma=0.99,
          gae_lambda=0.95,
          num_minibatches=4,
          update_epochs=1,
          norm_adv=True,
          clip_coef=0.1,
          clip_vloss=False,
          ent_coef=0.1,
          vf_coef=0.25,
          max_grad_norm=0.5,
          target_kl=ml_collections.FieldReference(None, field_type=float),
          lr=5e-4,
          num_validation_envs=1,
          seed=0,
          save_every=100,
          track_every=1000,
          # Beyond the reference.
          eval_episodes=16,
          log_every=10,
          keep_checkpoints=3,
          init_from='',
          mesh=sharding.default_mesh_config(),
      )
  )


def script(env: str, model_type: str, ticks: int) -> ml_collections.ConfigDict:
  """tasks/rl/scripts/<env>/train_<model_type>_<ticks>.sh."""
  d_model, memory_length = SCRIPTS[(env, model_type, ticks)]
  config = base()
  config.env_id = ENVS[env]
  config.model_type = model_type
  config.seed = 1
  config.model.update(
      iterations=ticks, d_model=d_model, memory_length=memory_length, n_synch_out=16,
      memory_hidden_dims=4,
  )
  if env == 'cartpole':
    config.model.d_input = 128
    config.update(max_environment_steps=200, total_timesteps=10_000_000, num_steps=100,
                  num_envs=256, update_epochs=1 if (model_type, ticks) == ('lstm', 5) else 4,
                  lr=1e-3, track_every=1000)
  elif env == 'acrobot':
    config.model.d_input = 64
    config.update(max_environment_steps=500, total_timesteps=2_000_000, num_steps=100,
                  num_envs=12, update_epochs=1, lr=5e-4, track_every=1000)
  else:
    config.model.update(d_input=128, memory_hidden_dims=16, n_synch_out=32)
    config.update(max_environment_steps=300, total_timesteps=300_000_000, num_steps=50,
                  num_envs=256, update_epochs=1, lr=1e-4, track_every=100)
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.variant(arg, VARIANTS)
  if variant in SCRIPT_VARIANTS:
    env, model_type, ticks = variant.split('_')
    return script(env, model_type, int(ticks))
  if variant == 'cartpole_small':
    config = script('cartpole', 'ctm', 2)
    config.model.update(d_model=64, d_input=64, memory_length=10)
    # A tenth of the scripts' entropy bonus: the sampled policy settles (docs/results.md).
    config.update(num_envs=64, num_steps=50, total_timesteps=1_000_000, update_epochs=4,
                  lr=1e-3, ent_coef=0.01, save_every=25, track_every=25, log_every=5,
                  eval_episodes=32)
    return config
  if variant == 'acrobot_small':
    config = script('acrobot', 'ctm', 2)
    config.model.update(d_model=64, d_input=32)
    config.update(num_envs=32, total_timesteps=1_000_000, ent_coef=0.01, save_every=25,
                  track_every=25, log_every=5, eval_episodes=32)
    return config
  if variant == '4rooms_small':
    config = script('4rooms', 'ctm', 2)
    config.model.update(d_model=128, d_input=32, memory_hidden_dims=4, n_synch_out=16,
                        memory_length=10)
    # A tenth of the script's entropy bonus and two epochs over 128
    # environments: the success rate rises (docs/results.md, FourRooms).
    config.update(num_envs=128, total_timesteps=5_000_000, lr=5e-4, ent_coef=0.01, update_epochs=2,
                  save_every=50, track_every=50, log_every=10, eval_episodes=32)
    return config
  # Seconds-long runs for tests: 3 iterations, a checkpoint and an eval at 2.
  if variant == '4rooms_smoke':
    config = script('4rooms', 'ctm', 1)
    config.model.update(d_model=16, d_input=8, n_synch_out=4, memory_hidden_dims=2, memory_length=3)
  else:
    config = script('cartpole', 'lstm' if variant == 'lstm_smoke' else 'ctm', 2)
    config.model.update(d_model=16, d_input=8, n_synch_out=4, memory_hidden_dims=2, memory_length=4)
  config.update(num_envs=16, num_steps=8, total_timesteps=16 * 8 * 2, num_minibatches=2,
                update_epochs=2, save_every=2, track_every=2, log_every=1, eval_episodes=2,
                max_environment_steps=20)
  return config
