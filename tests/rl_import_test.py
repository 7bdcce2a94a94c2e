"""The reference RL script's checkpoints (its PPO agent: `recurrent_model.*`,
`actor.*`, `critic.*`, args, training_iteration) import and act as saved."""

import argparse

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, load_golden, state_dict
from ctm_jax import train
from ctm_jax.configs import rl as rl_configs
from ctm_jax.interop import torch as torch_interop

torch = pytest.importorskip('torch')

# Golden case -> the environment whose observations it reads.
CASES = {
    'rl_classic': 'CartPole-v1',
    'rl_navigation': 'MiniGrid-FourRooms-v0',
    'lstm_rl_classic': 'Acrobot-v1',
    'lstm_rl_navigation': 'MiniGrid-FourRooms-v0',
}
ACTIONS = {'CartPole-v1': 2, 'Acrobot-v1': 3, 'MiniGrid-FourRooms-v0': 7}


def _script_args(meta, env_id):
  """The Namespace tasks/rl/train.py saves, for the golden's model."""
  kwargs = meta['constructor_kwargs']
  lstm = meta['case'].startswith('lstm_')
  return argparse.Namespace(
      model_type='lstm' if lstm else 'ctm',
      d_model=kwargs['d_model'], d_input=kwargs['d_input'], iterations=kwargs['iterations'],
      synapse_depth=kwargs.get('synapse_depth', 1), n_synch_out=kwargs.get('n_synch_out', 16),
      neuron_select_type=kwargs.get('neuron_select_type', 'random'),
      memory_length=kwargs.get('memory_length', 5), deep_memory=kwargs.get('deep_nlms', True),
      memory_hidden_dims=kwargs.get('memory_hidden_dims', 2), dropout=0.0,
      do_normalisation=kwargs.get('do_layernorm_nlm', False), continuous_state_trace=True,
      env_id=env_id, mask_velocity=True, max_environment_steps=300, num_steps=100,
      total_timesteps=1000, num_envs=8, anneal_lr=True, discount_gamma=0.99, gae_lambda=0.95,
      num_minibatches=4, update_epochs=1, norm_adv=True, clip_coef=0.1, clip_vloss=False,
      ent_coef=0.1, vf_coef=0.25, max_grad_norm=0.5, target_kl=None, lr=5e-4,
      num_validation_envs=1, log_dir='logs', tb_log_dir='logs/runs', run_name='run',
      save_every=100, seed=1, reload=True, track_every=1000, device=[-1], batch_size=800,
      minibatch_size=200, num_training_iterations=1,
  )


def _heads(hidden: int, actions: int, seed: int):
  rng = np.random.default_rng(seed)
  heads = {}
  for name, out in (('actor', actions), ('critic', 1)):
    for index, (fan_in, fan_out) in zip((0, 2, 4), ((hidden, 64), (64, 64), (64, out))):
      heads[f'{name}.{index}.weight'] = rng.normal(0, 1 / np.sqrt(fan_in), (fan_out, fan_in)).astype(np.float32)
      heads[f'{name}.{index}.bias'] = rng.normal(0, 0.1, (fan_out,)).astype(np.float32)
  return heads


def _mlp(heads, name, x):
  for index in (0, 2, 4):
    x = x @ heads[f'{name}.{index}.weight'].T.astype(np.float64) + heads[f'{name}.{index}.bias']
    if index < 4:
      x = np.maximum(x, 0)
  return x


def _save_reference_checkpoint(case, path):
  arrays, meta = load_golden(case)
  env_id = CASES[case]
  lstm = case.startswith('lstm_')
  hidden = arrays['__out__hidden_state' if lstm else '__out__synchronisation_out'].shape[1]
  heads = _heads(hidden, ACTIONS[env_id], 0)
  agent_sd = {f'recurrent_model.{k}': v for k, v in state_dict(arrays, meta).items()}
  agent_sd.update(heads)
  torch.save(
      {
          'model_state_dict': {k: torch.from_numpy(np.asarray(v)) for k, v in agent_sd.items()},
          'optimizer_state_dict': {},
          'global_step': 800,
          'training_iteration': 1,
          'episode_rewards_tracking': [np.float64(12.0)],
          'episode_lengths_tracking': [np.int64(12)],
          'global_steps_tracking': [800],
          'args': _script_args(meta, env_id),
      },
      path,
  )
  return arrays, heads


@pytest.mark.parametrize('case', sorted(CASES))
def test_reference_agent_checkpoint_imports_and_acts_as_saved(case, tmp_path):
  arrays, heads = _save_reference_checkpoint(case, tmp_path / 'checkpoint.pt')
  config = torch_interop.import_checkpoint(str(tmp_path / 'checkpoint.pt'), str(tmp_path / 'run'))
  assert (config['task'], config['iteration']) == ('rl', 1)
  assert config['model_kwargs']['num_actions'] == ACTIONS[CASES[case]]
  model, variables, _ = torch_interop.load_imported(str(tmp_path / 'run'))
  lstm = case.startswith('lstm_')
  if lstm:
    carry = (arrays['__in__hidden_state'], arrays['__in__cell_state'])
    hidden, new_carry = arrays['__out__hidden_state'], (arrays['__out__new_hidden_state'], arrays['__out__new_cell_state'])
  else:
    carry = (arrays['__in__hidden_state_trace'], arrays['__in__hidden_activated_state_trace'])
    hidden = arrays['__out__synchronisation_out']
    new_carry = (arrays['__out__state_trace'], arrays['__out__activated_state_trace'])
  x = jnp.asarray(arrays['__in__x'])
  done = jnp.zeros((x.shape[0],), bool)
  logits, value, carry_out, _ = jax.jit(model.apply)(variables, x, tuple(map(jnp.asarray, carry)), done)
  assert_close(logits, _mlp(heads, 'actor', hidden.astype(np.float64)), what='logits')
  assert_close(value, _mlp(heads, 'critic', hidden.astype(np.float64))[:, 0], what='value')
  assert_close(carry_out[0], new_carry[0], what='carry[0]')
  assert_close(carry_out[1], new_carry[1], what='carry[1]')
  exported = torch_interop.to_state_dict(variables, model)
  want = {f'recurrent_model.{k}': v for k, v in state_dict(*load_golden(case)).items()}
  want.update(heads)
  assert sorted(exported) == sorted(want)


@pytest.mark.slow  # a short PPO run
def test_training_starts_from_an_imported_reference_agent(tmp_path):
  flags.FLAGS.mark_as_parsed()
  arrays, _ = _save_reference_checkpoint('rl_classic', tmp_path / 'checkpoint.pt')
  torch_interop.import_checkpoint(str(tmp_path / 'checkpoint.pt'), str(tmp_path / 'imported'))
  _, variables, _ = torch_interop.load_imported(str(tmp_path / 'imported'))
  config = rl_configs.get_config('smoke')
  _, meta = load_golden('rl_classic')
  config.model.update({k: v for k, v in meta['constructor_kwargs'].items() if k in config.model})
  config.update(init_from=str(tmp_path / 'imported'), total_timesteps=config.num_envs * config.num_steps)
  runner = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(runner.step) == 2
  # Trained from the import: close to it after two small updates, not a fresh init.
  start = np.asarray(variables['params']['recurrent_model']['start_trace'])
  np.testing.assert_allclose(runner.params['recurrent_model']['start_trace'], start, atol=0.05)
  del arrays
