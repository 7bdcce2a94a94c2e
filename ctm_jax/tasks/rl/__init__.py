"""Reinforcement learning: the CTM (or the LSTM baseline) as a recurrent PPO
agent on partially observed control and navigation (the reference's tasks/rl).

No dataset: the task's program (`PPOTraining`, run by the one training loop
of ctm_jax/train.py) steps a jitted PPO iteration (ctm_jax/tasks/rl/ppo.py) of
the agent (ctm_jax/models/agent.py) on environments (ctm_jax/data/envs.py)
held in the state: parameters, optimiser, environments mid-episode, carried
agent state, reward statistics and RNG are checkpointed together, so a killed
run resumes bit for bit. A training iteration is one rollout and its updates:
the step of checkpoints, `save_every`, `track_every` and `log_every`.

Metrics: `episodes/return`, `episodes/length` (raw rewards, episodes that
ended in the logged window), `episodes/success` (MiniGrid), `losses/*` (the
reference's names), `train/sps` (environment steps per second, rollout and
update), and at each eval `eval/return`, `eval/length`, `eval/success` over
`eval_episodes` fresh episodes with sampled actions (as the reference
evaluates), `eval/greedy_*` with the most probable actions, and
`num_validation_envs` of the sampled episodes drawn to
`plots/episode_<step>_<i>.gif`; `eval/elapsed_s` is the wall time since
the run started (compile included), for success-against-time curves.

Dimension glossary: B environments, S evaluation steps, T ticks, D neurons.
"""

import os
import time

from absl import logging
import jax
from matplotlib import colormaps
import numpy as np
from PIL import Image
from PIL import ImageDraw

from ctm_jax import extras
from ctm_jax import program as program_lib
from ctm_jax import sharding
from ctm_jax.analysis import plots
from ctm_jax.data import envs as envs_lib
from ctm_jax.models import agent as agent_lib
from ctm_jax.tasks import base
from ctm_jax.tasks.rl import ppo

# The supervised trainer's keys that RL configs carry too.
RL_TRAINER_KEYS = frozenset(
    {'task', 'model', 'seed', 'lr', 'save_every', 'track_every', 'log_every', 'keep_checkpoints',
     'init_from', 'mesh'}
)
_POSITIVE = ('num_envs', 'num_steps', 'total_timesteps', 'num_minibatches', 'update_epochs',
             'max_environment_steps', 'eval_episodes')
_BOOLEANS = ('mask_velocity', 'anneal_lr', 'norm_adv', 'clip_vloss')


# The reference's PPO script in its checkout, and our config's fields that its
# flags take: (ours, its flag) in config.model, then the run's own (same names).
REFERENCE_SCRIPT = os.path.join('tasks', 'rl', 'train.py')
_REFERENCE_MODEL_FLAGS = (
    ('iterations', 'iterations'), ('d_model', 'd_model'), ('d_input', 'd_input'),
    ('synapse_depth', 'synapse_depth'), ('n_synch_out', 'n_synch_out'),
    ('neuron_select_type', 'neuron_select_type'), ('memory_length', 'memory_length'),
    ('deep_nlms', 'deep_memory'), ('memory_hidden_dims', 'memory_hidden_dims'),
    ('dropout', 'dropout'), ('do_layernorm_nlm', 'do_normalisation'),
    ('continuous_state_trace', 'continuous_state_trace'),
)
_REFERENCE_RUN_FLAGS = (
    'model_type', 'env_id', 'mask_velocity', 'max_environment_steps', 'num_steps', 'num_envs',
    'anneal_lr', 'discount_gamma', 'gae_lambda', 'num_minibatches', 'update_epochs', 'norm_adv',
    'clip_coef', 'clip_vloss', 'ent_coef', 'vf_coef', 'max_grad_norm', 'target_kl', 'lr',
    'num_validation_envs', 'seed', 'total_timesteps',
)


def _flag(name, value) -> list[str]:
  if value is None:  # target_kl None: the script's own default (no early stop)
    return []
  if isinstance(value, bool):  # argparse.BooleanOptionalAction
    return [f'--{name}' if value else f'--no-{name}']
  return [f'--{name}', repr(value) if isinstance(value, float) else str(value)]


def _fail(field, value, why):
  raise ValueError(f'config.{field}={value!r}: {why}')


@base.register
class ReinforcementLearning(base.Task, base.ImportsReference):
  """PPO on the reference's environments; the agent's recurrent model is the
  CTM (`model_type='ctm'`) or the LSTM baseline (`'lstm'`)."""

  name = 'rl'
  config_keys = frozenset(
      {'env_id', 'mask_velocity', 'max_environment_steps', 'num_steps', 'total_timesteps',
       'num_envs', 'anneal_lr', 'discount_gamma', 'gae_lambda', 'num_minibatches',
       'update_epochs', 'norm_adv', 'clip_coef', 'clip_vloss', 'ent_coef', 'vf_coef',
       'max_grad_norm', 'target_kl', 'num_validation_envs',
       'eval_episodes'}
  )
  # The runner's arrays are shaped by these: another value cannot resume.
  identity_keys = ('env_id', 'num_envs')
  trainer_keys = RL_TRAINER_KEYS
  model_class = agent_lib.CTMAgent
  baselines = {'lstm': agent_lib.LSTMAgent}
  reference_model_field = 'model_type'
  # The RL script's args carry the agent's options under their own names.
  reference_args_by_name = True

  def validate(self, config) -> None:
    extras.require('rl', f'config.task={config.task!r}')
    if config.env_id not in envs_lib.ENV_IDS:
      _fail('env_id', config.env_id, f'expected one of {", ".join(envs_lib.ENV_IDS)}')
    for field in _POSITIVE:
      value = config[field]
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(field, value, 'must be a positive integer')
    value = config.num_validation_envs
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      _fail('num_validation_envs', value, 'must be a non-negative integer')
    for field in _BOOLEANS:
      if not isinstance(config[field], bool):
        _fail(field, config[field], 'must be True or False')
    for field, low, high in (('discount_gamma', 0.0, 1.0), ('gae_lambda', 0.0, 1.0)):
      if not low <= config[field] <= high:
        _fail(field, config[field], f'must lie in [{low}, {high}]')
    for field in ('clip_coef', 'max_grad_norm'):
      if not config[field] > 0:
        _fail(field, config[field], 'must be > 0')
    for field in ('ent_coef', 'vf_coef'):
      if not config[field] >= 0:
        _fail(field, config[field], 'must be >= 0')
    if config.target_kl is not None and not config.target_kl > 0:
      _fail('target_kl', config.target_kl, 'must be > 0, or None for no early stop')
    if config.num_validation_envs > config.eval_episodes:
      _fail('num_validation_envs', config.num_validation_envs,
            f'gifs are drawn from the evaluation episodes: at most eval_episodes={config.eval_episodes}')
    if config.num_envs % config.num_minibatches:
      _fail('num_minibatches', config.num_minibatches, f'must divide num_envs={config.num_envs}')
    if ppo.steps_per_iteration(config) > config.total_timesteps:
      _fail('total_timesteps', config.total_timesteps,
            f'below one rollout (num_envs x num_steps = {ppo.steps_per_iteration(config)})')

  def validate_mesh(self, config, mesh_sizes) -> None:
    shards = sharding.batch_shards(mesh_sizes)
    per_minibatch = config.num_envs // config.num_minibatches
    if per_minibatch % shards:
      _fail(
          'num_envs', config.num_envs,
          f'each of the num_minibatches={config.num_minibatches} minibatches holds '
          f'{per_minibatch} environments, which must be divisible by the mesh batch axes '
          f'data x fsdp = {mesh_sizes["data"]} x {mesh_sizes["fsdp"]}; pass a multiple of '
          f'{shards * config.num_minibatches}, or fewer batch shards (--config.mesh.data, '
          '--config.mesh.neuron)',
      )

  def make_env(self, config):
    return envs_lib.make(config.env_id, config.max_environment_steps, config.mask_velocity)

  def make_model(self, config):
    """The agent: `config.model_type`'s recurrent model (its backbone chosen by
    the environment, as the reference's) under actor and critic heads."""
    env = self.make_env(config)
    model_type = config.get('model_type', 'ctm')
    fields = base.init_fields(self.model_class_for(model_type))
    known = set().union(*(base.init_fields(c) for c in self.model_types().values()))
    unknown = sorted(set(config.model) - known)
    if unknown:
      raise ValueError(f'{unknown[0]}: no RL model takes this option')
    kwargs = {k: v for k, v in config.model.to_dict().items() if k in fields}
    kwargs.update(backbone_type=env.backbone_type, num_actions=env.num_actions)
    return self.model_from_kwargs(model_type, kwargs)

  def training(self, config, model):
    return PPOTraining(config, model, self.make_env(config))

  # --- Benchmarks (benchmarks/rl_bench.py) ------------------------------------

  reference_script = REFERENCE_SCRIPT

  def loop_setup(self, config, model, mesh):
    """(init, iteration, abstract runner): the loop's jitted pieces on `mesh`."""
    jitted = _Jitted(config, model, self.make_env(config), mesh)
    return jitted.init, jitted.iteration, jitted.abstract

  def env_steps_per_iteration(self, config) -> int:
    return ppo.steps_per_iteration(config)

  def with_iterations(self, config, iterations: int):
    """`config` set to run `iterations` PPO iterations in our loop (the
    reference's runs one more: 0..total_timesteps // batch inclusive)."""
    config.total_timesteps = (iterations - 1) * self.env_steps_per_iteration(config)
    return config

  def describe_run(self, config) -> dict:
    return {
        'env': config.env_id,
        'model': config.get('model_type', 'ctm'),
        'batch': f'{config.num_envs} x {config.num_steps}',
    }

  def reference_script_flags(self, config) -> list[str]:
    """The reference script's command-line flags for every option it takes from `config`."""
    flags = []
    for ours, theirs in _REFERENCE_MODEL_FLAGS:
      flags += _flag(theirs, config.model[ours])
    for key in _REFERENCE_RUN_FLAGS:
      flags += _flag(key, config[key])
    return flags

  # --- Reference checkpoints ----------------------------------------------------

  def matches_reference_args(self, args: dict) -> bool:
    return 'env_id' in args and 'num_envs' in args

  def reference_model_kwargs(self, args: dict) -> dict:
    """The agent's options the RL script derives: backbone and action count
    from the environment, the NLM flags from their argument names."""
    env_id = base.required_arg(args, 'env_id', 'rl')
    if env_id not in envs_lib.ENV_IDS:
      raise ValueError(f'saved args: env_id={env_id!r}; ctm-jax has {", ".join(envs_lib.ENV_IDS)}')
    env = envs_lib.make(env_id, int(args.get('max_environment_steps') or 500))
    kwargs = {
        'backbone_type': env.backbone_type,
        'num_actions': env.num_actions,
        'prediction_reshaper': [-1],
        'continuous_state_trace': bool(args.get('continuous_state_trace', True)),
    }
    for arg, kwarg in (('deep_memory', 'deep_nlms'), ('do_normalisation', 'do_layernorm_nlm')):
      if args.get(arg) is not None:
        kwargs[kwarg] = bool(args[arg])
    return kwargs


# ---------------------------------------------------------------------------
# The loop.


def runner_shardings(abstract_runner, mesh, declared=None, rules=sharding.DEFAULT_RULES):
  """Parameters and optimiser state as the supervised trainer shards them;
  every per-environment array over the mesh's batch axes; the rest replicated."""
  shardings = sharding.state_shardings(abstract_runner, mesh, declared, rules)
  batch = sharding.batch_sharding(mesh)
  per_env = {
      name: jax.tree.map(lambda _: batch, getattr(abstract_runner, name))
      for name in ('env_state', 'obs', 'done_B', 'carry', 'normaliser', 'episode_return_B',
                   'episode_length_B')
  }
  return shardings.replace(**per_env)


class EpisodeSummary:
  """Iteration metrics of a log window: means of the losses, episode returns,
  lengths (and success) over the episodes that ended in it, environment steps
  per second."""

  def __init__(self, steps_per_iteration: int, goal: bool):
    self.steps_per_iteration, self.goal = steps_per_iteration, goal
    self.sums, self.count = {}, 0
    self.last_return = None

  def add(self, metrics: dict) -> None:
    for key, value in metrics.items():
      self.sums[key] = self.sums.get(key, 0.0) + float(value)
    self.count += 1

  def flush(self, done: int, seconds: float):
    scalars = {k: v / self.count for k, v in self.sums.items() if not k.startswith('episodes/')}
    episodes = self.sums.get('episodes/episodes', 0.0)
    scalars['episodes/count'] = episodes
    if episodes:
      scalars['episodes/return'] = self.sums['episodes/return'] / episodes
      scalars['episodes/length'] = self.sums['episodes/length'] / episodes
      if self.goal:
        scalars['episodes/success'] = self.sums['episodes/success'] / episodes
      self.last_return = scalars['episodes/return']
    scalars['train/sps'] = self.count * self.steps_per_iteration / max(seconds, 1e-9)
    scalars['train/global_step'] = done * self.steps_per_iteration
    postfix = {'loss': f"{scalars['train/loss']:.3f}"}
    if self.last_return is not None:
      postfix['return'] = f'{self.last_return:.1f}'
    postfix['sps'] = f"{scalars['train/sps']:.0f}"
    self.sums, self.count = {}, 0
    return scalars, postfix


class _Jitted:
  """The PPO iteration and the runner's init, jitted in their shardings on a mesh."""

  def __init__(self, config, agent, env, mesh):
    self.tx = tx = ppo.make_optimizer(config)

    def init():
      return ppo.init_runner(config, agent, env, tx, jax.random.key(config.seed))

    rules = sharding.rules_of(config.mesh)
    abstract = jax.eval_shape(init)
    example = agent.example_inputs(env.observation_shape, env.observation_dtype)
    declared = sharding.declared_axes(lambda: agent.init(jax.random.key(config.seed), *example))
    self.shardings = runner_shardings(abstract, mesh, declared, rules)
    self.iteration = jax.jit(
        sharding.under_rules(ppo.make_iteration(config, agent, env, tx), rules),
        in_shardings=(self.shardings,),
        out_shardings=(self.shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    self.abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.shardings
    )
    self.init = jax.jit(init, out_shardings=self.shardings)


class EpisodeEvaluator:
  """`eval_episodes` fresh episodes with sampled and with greedy actions;
  `num_validation_envs` of the sampled ones drawn to plots/episode_<step>_<i>.gif."""

  def __init__(self, config, agent, env, plot_dir: str, started: float):
    self.config, self.env, self.plot_dir, self.started = config, env, plot_dir, started
    episodes = config.eval_episodes

    @jax.jit
    def play(params, step):
      key = jax.random.fold_in(jax.random.key(config.seed + 1), step)
      sums, record = ppo.evaluate(config, agent, env, params, key, episodes, config.num_validation_envs)
      greedy, _ = ppo.evaluate(config, agent, env, params, key, episodes, greedy=True)
      scalars = {k: v.mean() for k, v in sums.items()}
      scalars.update({f'greedy_{k}': v.mean() for k, v in greedy.items()})
      return scalars, record

    self.play = play

  def run(self, state, step: int) -> dict[str, float]:
    scalars, record = self.play(state.params, step)
    scalars = {f'eval/{k}': float(v) for k, v in jax.device_get(scalars).items()}
    scalars['eval/elapsed_s'] = time.perf_counter() - self.started  # compile included
    if not getattr(self.env, 'goal', False):
      scalars.pop('eval/success'), scalars.pop('eval/greedy_success')
    logging.info('Iteration %d: %s', step, scalars)
    if jax.process_index() == 0 and self.config.num_validation_envs:
      _draw_episodes(self.env, record, os.path.join(self.plot_dir, f'episode_{step}'))
    return scalars


def _draw_episodes(env, record, path_prefix):
  """One gif per tracked evaluation episode: environment frames and neurons."""
  record = jax.device_get(record)
  paths = []
  for i in range(record['alive'].shape[1]):
    alive_S = np.asarray(record['alive'][:, i], bool)
    steps = max(int(alive_S.sum()), 1)  # alive from the start until the episode ends
    frames = np.stack([
        env.render(jax.tree.map(lambda x, s=s: x[s, i], record['env_state'])) for s in range(steps)
    ])
    paths.append(
        episode_gif(
            frames,
            np.asarray(record['post_activations'][:steps, :, i], np.float32),
            np.asarray(record['probs'][:steps, i]),
            np.asarray(record['value'][:steps, i]),
            np.asarray(record['action'][:steps, i]),
            f'{path_prefix}_{i}.gif',
            action_names=getattr(env, 'action_names', None),
        )
    )
  return paths


class PPOTraining:
  """PPO as a program of the training loop: a step is one rollout and its
  updates, the state the whole runner (parameters, optimiser, environments
  mid-episode, carried agent state, reward statistics, RNG), so a killed run
  resumes bit for bit; the step makes its own data."""

  def __init__(self, config, agent, env):
    self.config, self.agent, self.env = config, agent, env

  def program(self, mesh, plot_dir: str, started: float) -> program_lib.Program:
    config, agent, env = self.config, self.agent, self.env
    jitted = _Jitted(config, agent, env, mesh)
    per_iteration = ppo.steps_per_iteration(config)

    def beyond_total(latest, workdir):
      return (
          f'config.total_timesteps={config.total_timesteps}: {workdir} already holds a '
          f'checkpoint at iteration {latest} of {per_iteration} steps; '
          'pass a larger total_timesteps to continue it, or another --workdir'
      )

    def with_weights(runner, variables):
      return runner.replace(params=variables['params'], opt_state=jitted.tx.init(variables['params']))

    return program_lib.Program(
        describe=(f'rl on {config.env_id} ({config.num_envs} environments x '
                  f'{config.num_steps} steps each)'),
        unit='iteration',
        total=ppo.iterations(config),
        beyond_total=beyond_total,
        mesh=mesh,
        abstract_state=jitted.abstract,
        state_shardings=jitted.shardings,
        init=jitted.init,
        step=jitted.iteration,
        batches=None,
        summary=EpisodeSummary(per_iteration, getattr(env, 'goal', False)),
        watched=('train/loss', 'train/grad_norm'),
        evaluators=[EpisodeEvaluator(config, agent, env, plot_dir, started)],
        with_weights=with_weights,
    )


# ---------------------------------------------------------------------------
# The task's picture.


def episode_gif(
    frames_SxHxWx3, post_SxTxD, probs_SxA, values_S, actions_S, path, action_names=None,
    max_neurons: int = 64, frame_ms: int = 60,
) -> str:
  """An agent's episode, one frame per environment step: the environment,
  the post-activations of up to `max_neurons` neurons over every tick so far
  (neurons down, ticks across, blue negative, red positive), and the action
  probabilities with the chosen one marked and the value.

  S steps, T ticks per step, D neurons, A actions.
  """
  steps, ticks, neurons = post_SxTxD.shape
  if frames_SxHxWx3.shape[1] > 192:  # MiniGrid's full-grid frames: shrink for a small gif
    frames_SxHxWx3 = np.stack(
        [np.asarray(Image.fromarray(np.asarray(f, np.uint8)).resize((192, 192), Image.BILINEAR)) for f in frames_SxHxWx3]
    )
  shown = min(neurons, max_neurons)
  activity_DxST = post_SxTxD[:, :, :shown].reshape(steps * ticks, shown).T
  scale = float(np.abs(activity_DxST).max()) or 1.0
  colours = colormaps['seismic']((activity_DxST / scale + 1) / 2)[..., :3]
  height = max(frames_SxHxWx3.shape[1], 160)
  window = 100  # ticks shown: the newest
  names = action_names or [str(a) for a in range(probs_SxA.shape[1])]
  images = []
  for s in range(steps):
    canvas = Image.new('RGB', (frames_SxHxWx3.shape[2] + 360, height + 20), (255, 255, 255))
    canvas.paste(Image.fromarray(np.asarray(frames_SxHxWx3[s], np.uint8)), (0, 0))
    x0 = frames_SxHxWx3.shape[2] + 10
    end = (s + 1) * ticks
    raster = colours[:, max(0, end - window):end]
    raster_image = Image.fromarray((raster * 255).astype(np.uint8)).resize((200, height), Image.NEAREST)
    canvas.paste(raster_image, (x0, 0))
    draw = ImageDraw.Draw(canvas)
    bar_x = x0 + 210
    for a, p in enumerate(probs_SxA[s]):
      y = 10 + a * 18
      fill = (220, 60, 60) if a == int(actions_S[s]) else (90, 90, 200)
      draw.rectangle([bar_x, y, bar_x + int(100 * float(p)), y + 12], fill=fill)
      draw.text((bar_x + 104, y), names[a][:8], fill=(0, 0, 0))
    draw.text((bar_x, height - 20), f'value {float(values_S[s]):.2f}', fill=(0, 0, 0))
    draw.text((4, height + 4), f'step {s + 1}/{steps}', fill=(0, 0, 0))
    images.append(canvas.quantize(method=Image.Quantize.FASTOCTREE))
  return plots.save_gif(images, path, frame_ms)
