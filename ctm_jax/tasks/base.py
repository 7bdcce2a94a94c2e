"""The task interface, in parts a task opts into, and the registry.

- `Task`: every task. Name, config keys (and which fix a checkpoint's
  identity), model class, baselines and constructor kwargs.
- `Supervised`: training on data by a loss. Data sources, model inputs
  (any pytree), loss with per-example aux, train metrics, eval arrays; the
  training loop (`train.py`) runs it through `supervised.py`. Includes
  `Evaluated`.
- `Evaluated`: the evaluators a task offers, chosen by `config.evals`.
- `Predicts`: one input at a time (`ctm_jax.predict`).
- `ImportsReference`: the reference's checkpoints of this task (`interop/torch.py`).

A task that is not `Supervised` defines `training(config, model)` itself
(`tasks/rl/`). Code outside the tasks asks a task only through these parts,
and checks a part with `isinstance` before it uses it.

Dimension glossary: B batch, T ticks.
"""

import dataclasses
import importlib
import os
import pkgutil
import stat
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
  """The part every task has: its name, config keys, identity and model.

  A task subclasses `Task` and the parts it opts into (`Supervised`,
  `Evaluated`, `Predicts`, `ImportsReference`), sets `name` and decorates
  the class with `@register`. Methods take the whole config; a task keeps no
  state of its own, so one registered instance serves every run. A task
  that is not `Supervised` defines `training(config, model)` itself.
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

  def validate(self, config) -> None:
    """Raises ValueError naming `config.<key>=<value>` for a bad task key; reads no data."""

  def validate_mesh(self, config, mesh_sizes: dict[str, int]) -> None:
    """Raises ValueError for task keys that do not fit the mesh (`mesh_sizes`:
    axis -> size); the trainer's batch sizes are checked already."""

  def check_data(self, config) -> None:
    """Raises ValueError, saying how to fix it, when the task's data cannot be read."""

  def model_kwargs(self, config) -> dict:
    """Constructor kwargs of the model; by default `config.model` as it is."""
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
    model_type = config.get('model_type', 'ctm')
    own = init_fields(self.model_class_for(model_type))
    others = set().union(*(init_fields(c) for task in _REGISTRY.values() for c in task.model_types().values()))
    kwargs = {k: v for k, v in self.model_kwargs(config).items() if k in own or k not in others}
    return self.model_from_kwargs(model_type, kwargs)

  def model_from_kwargs(self, model_type: str, kwargs: dict):
    """The model of a record (a run's config, an import, an artefact): the one
    place a model is constructed."""
    return self.model_class_for(model_type)(**kwargs)


class Evaluated:
  """Part: the evaluators a task offers, chosen by `config.evals`.

  `evals` maps a name to `factory(context) -> evaluator | None` (None: the
  config asks for none of it, e.g. zero gifs); `config.evals` is a comma-
  separated list of names, where `default` stands for `default_evals`. The
  evaluators run in the order named (ctm_jax/evaluators.py).
  """

  evals: ClassVar[dict[str, Any]] = {
      'tick_accuracy': evaluators.TickAccuracy,
      'adaptive_compute': evaluators.AdaptiveCompute,
  }
  default_evals: ClassVar[tuple[str, ...]] = ('tick_accuracy', 'adaptive_compute')

  def eval_names(self, config) -> list[str]:
    """The names `config.evals` chooses, in order; ValueError naming an unknown one."""
    chosen = []
    for name in (n.strip() for n in str(config.get('evals', 'default')).split(',')):
      found = self.default_evals if name == 'default' else (name,) if name else ()
      for one in found:
        if one not in self.evals:
          raise ValueError(
              f'config.evals={config.evals!r}: {one!r} is not an evaluator of task {self.name!r}; '
              f'expected names among default, {", ".join(self.evals)}'
          )
        if one not in chosen:
          chosen.append(one)
    return chosen

  def evaluators(self, config, context) -> list:
    made = (self.evals[name](context) for name in self.eval_names(config))
    return [evaluator for evaluator in made if evaluator is not None]


class Supervised(Evaluated):
  """Part: training on held-out-able data, by a loss and train metrics.

  The training loop runs it through ctm_jax/supervised.py: the data
  (`record_spec`, `train_source`, `eval_source`, `train_transform`), how a
  batch feeds the model (`model_inputs`), the `loss` and `train_metrics`, and
  the per-example `eval_arrays` its evaluators read. Its evaluators are
  chosen by config (`Evaluated`, which it includes).
  """

  def training(self, config, model):
    """What the training loop (ctm_jax/train.py) runs for `config`: an object
    whose `program(mesh, plot_dir, started)` returns the run's
    `program.Program`. Made before the workdir is touched, so its checks
    (data readable, batch sizes) refuse a run before anything is written."""
    return supervised.Training(self, config, model)

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

  def model_inputs(self, batch) -> Any:
    """What `model.apply` takes of a batch: any pytree."""
    return batch['inputs']

  def example_batch(self, config) -> dict[str, jax.Array]:
    """A batch of one (ones), enough to initialise the model."""
    return {
        name: jnp.ones((1, *shape), dtype)
        for name, (shape, dtype) in self.record_spec(config).items()
    }

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


class Predicts:
  """Part: one input at a time (python -m ctm_jax.predict, its folder server)."""

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
    batch = {'inputs': array.astype(np.float32)[None]}
    check_finite(batch, source)
    return batch

  def describe(self, config, prediction_O: np.ndarray) -> str:
    """One tick's answer as a user reads it, from its (O,) logits."""
    del config
    return f'class {int(np.argmax(prediction_O))}'

  def trace_path(self, config, inputs, prediction_O: np.ndarray) -> dict | None:
    """Where one tick's answer walks on the input, for the server's page: a
    maze's route as {'cells': [[y, x], ...], 'blocked': [y, x] or None} in
    input pixels; None for tasks whose answer is not a path."""
    del config, inputs, prediction_O
    return None

  def fresh_example(self, config, seed: int) -> dict[str, np.ndarray] | None:
    """A new batch of one from the task's own generator (the server page's
    "generate" button: a maze never seen), seeded by `seed`; None for tasks
    that generate nothing worth showing (the page offers their held-out
    records, files and typed input instead)."""
    del config, seed
    return None

  def prediction_gif(self, config, model, variables, batch, path: str) -> str:
    """Draws a one-example batch's ticks (attention, answer, certainty) to a gif at `path`."""
    del config, model, variables, batch, path
    raise ValueError(f'task {self.name!r} draws no gif')


class ImportsReference:
  """Part: reads checkpoints of the reference's training script for this task
  (ctm_jax/interop/torch.py)."""

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
    raise NotImplementedError

  def reference_model_kwargs(self, args: dict) -> dict:
    """The task-derived constructor kwargs (out_dims, prediction_reshaper, ...)
    the reference's training script sets from its saved `args`."""
    raise NotImplementedError

  def matches_model_kwargs(self, kwargs: dict) -> bool:
    """Whether the reference constructor's `kwargs` (a Hub model's config.json)
    build this task's model."""
    del kwargs
    return False


def init_fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ('parent', 'name')}


_REGISTRY: dict[str, Task] = {}
_DISCOVERED = False


def register(cls: type[Task]) -> type[Task]:
  """Class decorator: makes `cls` the task named `cls.name`."""
  if not cls.name:
    raise ValueError(f'{cls.__qualname__}: a task needs a name')
  if not issubclass(cls, Task):
    raise ValueError(f'task {cls.name!r}: subclass tasks.Task')
  if not callable(getattr(cls, 'training', None)):
    raise ValueError(
        f'task {cls.name!r}: subclass tasks.Supervised, or define training(config, model) '
        'returning what the training loop runs'
    )
  if issubclass(cls, Evaluated) and not set(cls.default_evals) <= set(cls.evals):
    missing = sorted(set(cls.default_evals) - set(cls.evals))
    raise ValueError(f'task {cls.name!r}: default_evals names {missing}, which evals lacks')
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


def with_part(part: type) -> list[Task]:
  """The registered tasks that opted into `part` (e.g. `ImportsReference`), by name."""
  return [get(name) for name in names() if isinstance(get(name), part)]


def get(name: str) -> Task:
  """The registered task `name`; ValueError naming the known ones otherwise."""
  _discover()
  if name not in _REGISTRY:
    raise ValueError(f'config.task={name!r} is unknown; expected one of {", ".join(names())}')
  return _REGISTRY[name]


# The largest input file a command reads: one example is far smaller.
MAX_INPUT_BYTES = 64 << 20


def check_input_file(path: str, named: str = '') -> None:
  """ValueError (one line starting `named`, default --input=PATH) when `path` exists but is not a
  regular file (a pipe would block the read forever, a device never ends) or
  is over MAX_INPUT_BYTES; nothing when it is not a path (text) or a folder."""
  try:
    info = os.stat(path)
  except (OSError, ValueError):
    return
  named = named or f'--input={path}'
  if stat.S_ISDIR(info.st_mode):
    return
  if not stat.S_ISREG(info.st_mode):
    raise ValueError(f'{named}: not a regular file (a pipe, device or socket); give a file')
  if info.st_size > MAX_INPUT_BYTES:
    raise ValueError(
        f'{named}: {info.st_size} bytes, over the {MAX_INPUT_BYTES} an input may be; give one example'
    )


def check_finite(batch: dict, source: str) -> None:
  """ValueError naming `source` when an input array holds NaN or infinity."""
  for name, value in batch.items():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      raise ValueError(f'--input={source}: its {name} hold NaN or infinite values; give finite numbers')


def text_input(source: str) -> str:
  """`--input` for tasks whose input is text: the file's text when `source`
  names a file, else `source` itself (e.g. parity bits on the command line)."""
  check_input_file(source)
  if os.path.isfile(source):
    with open(source) as f:
      return f.read(1 << 20)
  return source


def required_arg(args: dict, name: str, task: str):
  """`args[name]` of a reference checkpoint, or a ValueError naming it."""
  if args.get(name) is None:
    raise ValueError(f'saved args lack {name!r}, needed for the {task} model')
  return args[name]
