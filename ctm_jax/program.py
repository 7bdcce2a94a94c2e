"""What a task hands the training loop: a `Program`.

The loop (ctm_jax/train.py) owns everything every run shares: the workdir and
its lock, restore / `init_from` / fresh init, the config record, checkpoints,
metric writers, the progress bar, the log / eval / save cadence, stop
requests and SIGTERM. A task supplies only what differs (`Task.training`):
how a batch is made (or that the step makes its own, as a PPO rollout does),
the jitted step, how its metrics are summarised, and its evaluators.

Supervised tasks get theirs from ctm_jax/supervised.py; a task that trains
otherwise (environments instead of a dataset) builds its own from the same parts.
"""

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import jax

# Batch key (and step metric) carrying each process's stop request in
# multi-process runs of programs that read batches.
STOP_KEY = 'stop'
# The step metric that says whether the step was finite (and so applied).
FINITE_KEY = 'finite'


class Summary(Protocol):
  """A log window's metrics: fed each step's host metrics, read at each log."""

  def add(self, metrics: dict) -> None:
    """One step's metrics (numpy, on the host), FINITE_KEY and STOP_KEY removed."""

  def flush(self, done: int, seconds: float) -> tuple[dict[str, float], dict[str, str]]:
    """(scalars to log at step `done`, progress-bar postfix) of the window's
    steps, which took `seconds`; then starts the next window."""


class Evaluator(Protocol):

  def run(self, state, step: int) -> dict[str, float]:
    """Scalars `eval/...` at `step`; writes its own artefacts (plots, gifs)."""


@dataclasses.dataclass(frozen=True)
class Program:
  """One run's training, as the loop runs it."""

  describe: str  # the run in the start log line: the task's name, its environment, ...
  unit: str  # what a step is called in messages and the progress bar: 'step', 'iteration'
  total: int  # the run ends after this many steps
  # (latest checkpointed step beyond `total`, workdir) -> the UsageError naming the field to raise.
  beyond_total: Callable[[int, str], str]
  mesh: jax.sharding.Mesh
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings: the restore target
  state_shardings: Any
  init: Callable[[], Any]  # jitted: a fresh state, created in its shardings
  # Jitted, state donated: (state, global batch) -> (state, metrics), or
  # (state) -> (state, metrics) when `batches` is None. Metrics hold
  # FINITE_KEY (False: the update was not applied) and, for batches with
  # STOP_KEY, STOP_KEY.
  step: Callable
  # This process's batches (a checkpointable grain iterator); None when the
  # step makes its own data (environments in the state).
  batches: Iterator | None
  summary: Summary
  watched: tuple[str, ...]  # metrics a non-finite step's message names
  evaluators: list  # Evaluator, run in order at every eval
  # (state, variables of an imported checkpoint) -> state: config.init_from.
  with_weights: Callable[[Any, dict], Any]
