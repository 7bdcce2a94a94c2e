"""The task interface and its registry.

A task owns everything problem-specific: its config keys (and which of them
fix a checkpoint's identity), its model class and constructor kwargs, its data
sources, how a batch becomes model inputs (any pytree), its loss with per-example
aux, its train metrics, the per-example arrays its eval step returns, its
evaluators, and how a reference checkpoint's saved args map onto its model.
The trainer (`train.py`, through the `Program` of `training`), `supervised.py`,
`steps.py`, `checkpoint.py`, `validation.py`, `interop/torch.py`, `tools/` and
`benchmarks/` call these methods only.

Dimension glossary: B batch, T ticks.
"""

import dataclasses
import importlib
import os
import pkgutil
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import evaluators
from ctm_jax import supervised
from ctm_jax.models import ctm as ctm_lib

# Spec of one model-ready example: leaf name -> (shape without batch, dtype).
RecordSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


class Task:
  """Subclass, set `name` and the abstract methods, and decorate with `@register`.

  Methods take the whole config; a task keeps no state of its own, so one
  registered instance serves every run.
  """

  name: ClassVar[str] = ''
  # Top-level config keys of this task, beyond the trainer's (validation.TRAIN_KEYS).
  config_keys: ClassVar[frozenset[str]] = frozenset()
  # Those of `config_keys` whose change makes a workdir's checkpoints meaningless
  # (`task` and `model` always do).
  identity_keys: ClassVar[tuple[str, ...]] = ()
  # The model variant: ContinuousThoughtMachine or a subclass in models/<variant>.py.
  model_class: ClassVar[type] = ctm_lib.ContinuousThoughtMachine
  # The trainer keys its configs carry: None for supervised training's
  # (validation.TRAIN_KEYS); a task with its own kind of training names its own.
  trainer_keys: ClassVar[frozenset[str] | None] = None
  # The baselines this task also trains (`config.model_type`, the reference's
  # --model / --model_type): e.g. {'lstm': lstm.LSTMBaseline}.
  baselines: ClassVar[dict[str, type]] = {}

  # --- Config and data ----------------------------------------------------------

  def training(self, config, model):
    """What the training loop (ctm_jax/train.py) runs for `config`: an object
    whose `program(mesh, plot_dir, started)` returns the run's
    `program.Program`. Made before the workdir is touched, so its checks
    (data readable, batch sizes) refuse a run before anything is written.
    By default supervised training on the task's data, loss and evaluators
    (ctm_jax/supervised.py)."""
    return supervised.Training(self, config, model)

  # Whether the task reads held-out inputs (evaluate, predict): a task whose
  # program makes its own data (environments) has none.
  has_held_out_inputs: ClassVar[bool] = True

  def validate(self, config) -> None:
    """Raises ValueError naming `config.<key>=<value>` for a bad task key; reads no data."""

  def validate_mesh(self, config, mesh_sizes: dict[str, int]) -> None:
    """Raises ValueError for task keys that do not fit the mesh (`mesh_sizes`:
    axis -> size); the trainer's batch sizes are checked already."""

  def check_data(self, config) -> None:
    """Raises ValueError, saying how to fix it, when the task's data cannot be read."""

  def record_spec(self, config) -> RecordSpec:
    """Shapes and dtypes of one model-ready example, without reading data."""
    raise NotImplementedError

  def train_source(self, config):
    """A grain random-access source of train records."""
    raise NotImplementedError

  def eval_source(self, config):
    """A grain random-access source of model-ready held-out records."""
    raise NotImplementedError

  def train_transform(self, config):
    """(record, np.random.Generator) -> example, run per train record in the
    pipeline (augmentation); None when train records are model-ready."""
    del config
    return None

  def synthetic_batch(self, config, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """A batch with the task's shapes and value ranges, made up (benchmarks, sizing)."""
    raise NotImplementedError

  # --- Model ----------------------------------------------------------------------

  def model_kwargs(self, config) -> dict:
    """Constructor kwargs of `model_class`; by default `config.model` as it is."""
    return config.model.to_dict()

  def model_types(self) -> dict[str, type]:
    """`config.model_type` -> model class: 'ctm' and the task's baselines."""
    return {'ctm': self.model_class, **self.baselines}

  def model_class_for(self, model_type: str = 'ctm') -> type:
    types = self.model_types()
    if model_type not in types:
      raise ValueError(f'model_type={model_type!r}: task {self.name!r} trains {", ".join(map(repr, types))}')
    return types[model_type]

  def make_model(self, config):
    """`config.model_type`'s class with `model_kwargs(config)`. config.model is
    shared by the model types: each takes the options it has, those of the
    other types are left out, and an option no model has is refused."""
    cls = self.model_class_for(config.get('model_type', 'ctm'))
    own = init_fields(cls)
    others = set().union(*(init_fields(c) for task in _REGISTRY.values() for c in task.model_types().values()))
    kwargs = {k: v for k, v in self.model_kwargs(config).items() if k in own or k not in others}
    return cls(**kwargs)

  def model_inputs(self, batch) -> Any:
    """What `model.apply` takes of a batch: any pytree."""
    return batch['inputs']

  def example_batch(self, config) -> dict[str, jax.Array]:
    """A batch of one (ones), enough to initialise the model."""
    return {
        name: jnp.ones((1, *shape), dtype)
        for name, (shape, dtype) in self.record_spec(config).items()
    }

  # --- Loss, metrics, evaluation -------------------------------------------------

  def loss(self, config, output, batch) -> tuple[jax.Array, dict]:
    """(scalar loss, aux): aux holds per-example arrays, at least `most_certain_B`
    (the tick the loss and the metrics read), and whatever else the task needs."""
    raise NotImplementedError

  def correct(self, output, batch) -> jax.Array:
    """Per-tick accuracy of every example, (B, T) in [0, 1]."""
    raise NotImplementedError

  def scored(self, config, output, batch) -> jax.Array:
    """`correct` at the ticks the loss and metrics read, (B, T'); by default
    every tick (Q&A-MNIST: its answer ticks)."""
    del config
    return self.correct(output, batch)

  def train_metrics(self, config, output, batch, loss, aux) -> dict[str, jax.Array]:
    """Sums over the batch, named `<metric>_sum`, and `count`; the host logs
    `train/<metric>` = sum / count (a (T,) sum gives `train/<metric>_<t>`)."""
    correct_BxT = self.scored(config, output, batch)
    most_certain_B = aux['most_certain_B']
    rows = jnp.arange(correct_BxT.shape[0])
    return {
        'loss_sum': loss * correct_BxT.shape[0],
        'acc_tick_sum': correct_BxT.sum(0),
        'acc_most_certain_sum': correct_BxT[rows, most_certain_B].sum(),
        'acc_last_sum': correct_BxT[:, -1].sum(),
        'most_certain_tick_sum': most_certain_B.sum().astype(jnp.float32),
        'count': jnp.asarray(correct_BxT.shape[0], jnp.float32),
    }

  def eval_arrays(self, config, output, batch, aux) -> dict[str, jax.Array]:
    """Per-example arrays the eval step returns, (B, ...) and small (never logits);
    the evaluators read them over the whole held-out set."""
    return {
        'correct_BxT': self.scored(config, output, batch).astype(jnp.float32),
        'certainty_BxT': output.certainties[:, 1].astype(jnp.float32),
        'most_certain_B': aux['most_certain_B'].astype(jnp.int32),
    }

  def evaluators(self, config, context) -> list:
    """The evaluators run at every eval (ctm_jax/evaluators.py), given an
    `evaluators.Context`; by default per-tick accuracy and adaptive compute."""
    del config
    return [evaluators.TickAccuracy(context), evaluators.AdaptiveCompute(context)]

  # --- One input at a time (python -m ctm_jax.predict) ------------------------

  def read_input(self, config, source: str) -> dict[str, np.ndarray]:
    """A batch of one from a user's file: {'inputs'}, plus 'targets' where the
    input determines them. `config` is a run's or an import's (inference.load).
    Every task reads a `.npy` of one model-ready example; tasks add their own
    formats. ValueError naming `source` and the format expected."""
    del config
    if not source.lower().endswith('.npy'):
      raise ValueError(f'--input={source}: task {self.name!r} reads a .npy of one model-ready example')
    try:
      array = np.load(source, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f'--input={source}: cannot read it as a .npy array ({e})') from None
    if not np.issubdtype(array.dtype, np.number):
      raise ValueError(f'--input={source}: a {array.dtype} array; expected numbers')
    return {'inputs': array.astype(np.float32)[None]}

  def describe(self, config, prediction_O: np.ndarray) -> str:
    """One tick's answer as a user reads it, from its (O,) logits."""
    del config
    return f'class {int(np.argmax(prediction_O))}'

  def prediction_gif(self, config, model, variables, batch, path: str) -> str:
    """Draws a one-example batch's ticks (attention, answer, certainty) to a gif at `path`."""
    del config, model, variables, batch, path
    raise ValueError(f'task {self.name!r} draws no gif')

  # --- Reference checkpoints (ctm_jax/interop/torch.py) -------------------------

  # The saved-args field that names the model type ('ctm' for a CTM).
  reference_model_field: ClassVar[str] = 'model'
  # True when the reference script saves the model's options under the model
  # class's own field names (read as a baseline's are), not ARG_TO_KWARG's.
  reference_args_by_name: ClassVar[bool] = False
  # Constructor args this task's reference script does not save (it has no
  # flag for them), with the values it builds the model with.
  reference_arg_defaults: ClassVar[dict] = {}
  # The reference's utils/losses.py function this task trains with ('' for
  # `<name>_loss`); the benchmark's reference step calls it.
  reference_loss: ClassVar[str] = ''

  def matches_reference_args(self, args: dict) -> bool:
    """Whether a reference training script of this task saved `args`."""
    del args
    return False

  def reference_model_kwargs(self, args: dict) -> dict:
    """The task-derived constructor kwargs (out_dims, prediction_reshaper, ...)
    the reference's training script sets from its saved `args`."""
    raise NotImplementedError(f'task {self.name!r} cannot import reference checkpoints')


def init_fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ('parent', 'name')}


_REGISTRY: dict[str, Task] = {}
_DISCOVERED = False


def register(cls: type[Task]) -> type[Task]:
  """Class decorator: makes `cls` the task named `cls.name`."""
  if not cls.name:
    raise ValueError(f'{cls.__qualname__}: a task needs a name')
  previous = _REGISTRY.get(cls.name)
  if previous is not None and (
      type(previous).__module__,
      type(previous).__qualname__,
  ) != (cls.__module__, cls.__qualname__):
    raise ValueError(f'task {cls.name!r} is already registered by {type(previous).__module__}')
  _REGISTRY[cls.name] = cls()
  return cls


def _discover():
  """Imports every module of this package once, so that each registers its task."""
  global _DISCOVERED
  if _DISCOVERED:
    return
  _DISCOVERED = True
  package = importlib.import_module('ctm_jax.tasks')
  for module in pkgutil.iter_modules(package.__path__):
    if module.name != 'base' and not module.name.startswith('_'):
      importlib.import_module(f'ctm_jax.tasks.{module.name}')


def names() -> list[str]:
  _discover()
  return sorted(_REGISTRY)


def get(name: str) -> Task:
  """The registered task `name`; ValueError naming the known ones otherwise."""
  _discover()
  if name not in _REGISTRY:
    raise ValueError(f'config.task={name!r} is unknown; expected one of {", ".join(names())}')
  return _REGISTRY[name]


def text_input(source: str) -> str:
  """`--input` for tasks whose input is text: the file's text when `source`
  names a file, else `source` itself (e.g. parity bits on the command line)."""
  if os.path.isfile(source):
    with open(source) as f:
      return f.read(1 << 20)
  return source


def required_arg(args: dict, name: str, task: str):
  """`args[name]` of a reference checkpoint, or a ValueError naming it."""
  if args.get(name) is None:
    raise ValueError(f'saved args lack {name!r}, needed for the {task} model')
  return args[name]
