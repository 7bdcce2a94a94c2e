"""Evaluators: small objects a task offers by name (`Evaluated.evals`, chosen by `config.evals`), each with
`run(state, step) -> {'eval/...': float}` that also writes its own artefacts
(plots, tables, gifs) under the run's plot dir. The train loop calls them in
order at every eval and knows nothing else about them.

Evaluators that read the held-out set share one pass per step through
`Context.held_out`, which runs the jitted eval step over the eval batches and
keeps the per-example arrays (the task's `eval_arrays`) on the host.

Dimension glossary: B batch, T ticks, N attended positions (an h x w feature
map), A top classes shown.
"""

import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import compiling
from ctm_jax import sharding
from ctm_jax import steps
from ctm_jax import storage
from ctm_jax.analysis import evaluation
from ctm_jax.analysis import metrics as metrics_lib
from ctm_jax.analysis import plots


@dataclasses.dataclass
class Context:
  """What evaluators may use: the run's pieces and one cached held-out pass."""

  config: Any
  task: Any
  model: Any
  run: Any  # supervised.Setup: mesh, shardings, the jitted eval step
  eval_source: Any
  eval_batches: list  # this process's host batches
  plot_dir: str
  started: float  # time.perf_counter() when the trainer started
  _cache: tuple | None = None

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0

  @property
  def title(self) -> str:
    return self.task.name

  def held_out(self, state, step: int) -> tuple[dict[str, np.ndarray], float]:
    """(per-example arrays over the whole held-out set, mean loss) at `step`, computed once."""
    if self._cache is not None and self._cache[0] == step:
      return self._cache[1], self._cache[2]
    total = None
    per_batch = []
    for batch in self.eval_batches:
      sums, per_example = self.run.eval_step(state, sharding.global_batch(batch, self.run.mesh))
      total = steps.add_sums(total, sums)
      per_batch.append(per_example)
    total, per_batch = jax.device_get((total, per_batch))
    per_example = evaluation.concatenate(per_batch)
    loss = float(total['loss_sum']) / float(total['count'])
    self._cache = (step, per_example, loss)
    return per_example, loss


class TickAccuracy:
  """Loss, accuracy at every tick / the most-certain tick / the last tick, mean
  certainty; plot `eval_ticks_<step>.png` of accuracy and certainty against tick."""

  def __init__(self, context: Context):
    self.context = context

  def run(self, state, step: int) -> dict[str, float]:
    ctx = self.context
    per_example, loss = ctx.held_out(state, step)
    most_certain_N = per_example['most_certain_B']
    scalars = {'eval/loss': loss}
    scalars.update(evaluation.per_tick(per_example['correct_BxT'], most_certain_N, 'eval', 'acc'))
    scalars['eval/most_certain_tick'] = float(np.mean(most_certain_N))
    certainty_T = per_example['certainty_BxT'].mean(axis=0)
    scalars['eval/certainty_last'] = float(certainty_T[-1])
    # Wall time of this process so far, compile included (time-to-accuracy).
    scalars['eval/elapsed_s'] = time.perf_counter() - ctx.started
    path = os.path.join(ctx.plot_dir, f'eval_ticks_{step:07d}.png')
    if ctx.is_chief:
      plots.plot_ticks(
          per_example['correct_BxT'].mean(axis=0),
          certainty_T,
          path,
          title=f'{ctx.title}: eval at step {step}',
      )
    logging.info(
        'eval step %d: loss %.4f, acc most-certain %.4f, last tick %.4f (plot %s)',
        step,
        loss,
        scalars['eval/acc_most_certain'],
        scalars['eval/acc_last'],
        path,
    )
    return scalars


class TopK:
  """A per-tick hit array of the task's (e.g. `top5_BxT`) as `eval/<name>_*`;
  with `plot_label`, also plotted against tick (`eval_<name>_<step>.png`)."""

  def __init__(self, context: Context, key: str, name: str, plot_label: str = ''):
    self.context, self.key, self.name, self.plot_label = context, key, name, plot_label

  def run(self, state, step: int) -> dict[str, float]:
    ctx = self.context
    per_example, _ = ctx.held_out(state, step)
    hits_BxT = per_example[self.key]
    if self.plot_label and ctx.is_chief:
      plots.plot_ticks(
          hits_BxT.mean(axis=0),
          per_example['certainty_BxT'].mean(axis=0),
          os.path.join(ctx.plot_dir, f'eval_{self.name}_{step:07d}.png'),
          title=f'{ctx.title}: eval at step {step}',
          label=self.plot_label,
      )
    return evaluation.per_tick(hits_BxT, per_example['most_certain_B'], 'eval', self.name)


class Calibration:
  """Expected calibration error of the task's `confidence_BxT` against `correct_BxT`."""

  def __init__(self, context: Context, num_bins: int = 15):
    self.context, self.num_bins = context, num_bins

  def run(self, state, step: int) -> dict[str, float]:
    per_example, _ = self.context.held_out(state, step)
    return evaluation.calibration(
        per_example['confidence_BxT'],
        per_example['correct_BxT'],
        per_example['most_certain_B'],
        'eval',
        self.num_bins,
    )


class AdaptiveCompute:
  """Accuracy against ticks used when each example stops at its first tick with
  certainty >= a threshold; `adaptive_compute_<step>.{json,png}` and a logged table."""

  def __init__(self, context: Context, thresholds=metrics_lib.DEFAULT_THRESHOLDS):
    self.context, self.thresholds = context, thresholds

  def run(self, state, step: int) -> dict[str, float]:
    ctx = self.context
    per_example, _ = ctx.held_out(state, step)
    scalars, table = evaluation.adaptive(
        per_example['correct_BxT'],
        per_example['certainty_BxT'],
        per_example['most_certain_B'],
        'eval',
        self.thresholds,
    )
    logging.info(
        'eval step %d: adaptive compute (stop at the first tick this certain):\n%s',
        step,
        metrics_lib.format_adaptive_table(table),
    )
    if ctx.is_chief:
      path = os.path.join(ctx.plot_dir, f'adaptive_compute_{step:07d}')
      storage.write_text(path + '.json', json.dumps({'step': step, **table}, indent=1))
      plots.plot_adaptive_compute(
          table, path + '.png', title=f'{ctx.title}: adaptive compute at step {step}'
      )
    return scalars


def head_mean_attention(output):
  """(B, T, N) attention weights of a tracked forward, averaged over heads."""
  attention_TxBxN = output.tracking.attention.astype(jnp.float32).mean(axis=(2, 3))
  return jnp.moveaxis(attention_TxBxN, 0, 1)


def attention_arrays(model, variables, images, num_top: int) -> dict[str, jax.Array]:
  """Per-tick attention maps and top classes of a few images: `attention_BxTxN`
  (averaged over heads), `top_probs_BxTxA`, `top_classes_BxTxA` (the A =
  `num_top` most probable classes) and `certainty_BxT`."""
  output = model.apply(variables, images, track=True)
  probs_BxTxC = jax.nn.softmax(jnp.moveaxis(output.predictions.astype(jnp.float32), 1, 2), axis=-1)
  top_probs_BxTxA, top_classes_BxTxA = jax.lax.top_k(probs_BxTxC, num_top)
  return {
      'attention_BxTxN': head_mean_attention(output),
      'top_probs_BxTxA': top_probs_BxTxA,
      'top_classes_BxTxA': top_classes_BxTxA,
      'certainty_BxT': output.certainties[:, 1].astype(jnp.float32),
  }


def make_attention_step(model, num_top: int):
  """(state, images) -> `attention_arrays` of a train state's model."""
  return tracked_step(lambda m, variables, images: attention_arrays(m, variables, images, num_top))(model)


def feature_grid(model, input_shape) -> tuple[int, int]:
  """(h, w) of the feature map the model attends over for inputs of `input_shape`.

  Read from the backbone's output shape (abstractly: nothing is computed); the
  input itself when the model has no backbone.
  """

  def is_backbone_call(module, method):
    return module.name == 'backbone' and method == '__call__'

  def backbone_output(x):
    _, variables = model.init_with_output(
        jax.random.key(0), x, capture_intermediates=is_backbone_call
    )
    return variables.get('intermediates', {})

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  captured = jax.tree.leaves(jax.eval_shape(backbone_output, x))
  shape = captured[0].shape if captured else x.shape
  if len(shape) != 4:
    raise ValueError(f'the backbone maps inputs {input_shape} to {shape[1:]}, not a 2-D map')
  return shape[1], shape[2]


def replicated_step(context: Context, step, inputs):
  """(`inputs`, a pytree of host arrays the same on every process, placed
  replicated on the run's mesh; `step`: (state, inputs) -> arrays, jitted
  with the train state's shardings and a replicated output)."""
  replicated = sharding.replicated(context.run.mesh)
  placed = jax.tree.map(
      lambda a: jax.make_array_from_callback(a.shape, replicated, lambda i: a[i]), inputs
  )
  jitted = compiling.jit(step, in_shardings=(context.run.state_shardings, replicated), out_shardings=replicated)
  return placed, jitted


def tracked_step(tracked):
  """(state, inputs) -> `tracked(model, variables, inputs)` of a train state's model."""

  def make_step(model):
    def step(state, inputs):
      return tracked(model, steps.variables(state, state.params), inputs)

    return step

  return make_step


class RecordGifs:
  """A gif per held-out record for the first `count` records (process 0), drawn
  from a jitted tracked forward (`make_step(model)`: (state, inputs) -> arrays
  with a leading batch axis) of the records' stacked `inputs`.

  The records are the same on every process, so they go in replicated; the
  tracked step is jitted once and runs without the logical rules, whose batch
  constraint a few records cannot satisfy. Every process runs it (one SPMD
  program); process 0 draws each record with `draw(index, record, tracked,
  step)`, `tracked` being that record's row of every array.
  """

  input_keys = ('inputs',)  # the record fields the model reads; one is passed bare

  def __init__(self, context: Context, count: int, make_step):
    self.context = context
    count = min(count, len(context.eval_source))
    self.active = bool(count) and self.can_draw(context.model)
    if not self.active:
      return
    self.records = [context.eval_source[i] for i in range(count)]
    stacked = {k: np.stack([np.asarray(r[k]) for r in self.records]) for k in self.input_keys}
    self.host_inputs = stacked if len(self.input_keys) > 1 else stacked[self.input_keys[0]]
    self.inputs, self.step_fn = replicated_step(context, make_step(context.model), self.host_inputs)

  def can_draw(self, model) -> bool:
    del model
    return True

  def draw(self, index: int, record, tracked: dict, step: int):
    raise NotImplementedError

  def run(self, state, step: int) -> dict[str, float]:
    if not self.active:
      return {}
    tracked = jax.device_get(self.step_fn(state, self.inputs))
    if not self.context.is_chief:
      return {}
    for i, record in enumerate(self.records):
      self.draw(i, record, {k: v[i] for k, v in tracked.items()}, step)
    return {}


class TrackedGifs(RecordGifs):
  """RecordGifs of images whose attention (`attention_BxTxN` among the tracked
  arrays) is over an h x w feature map: subclasses draw with
  `draw_image(index, tracked, attention_Txhxw, step)`."""

  def __init__(self, context: Context, count: int, make_step):
    super().__init__(context, count, make_step)
    if self.active:
      self.images = self.host_inputs
      self.targets = [np.asarray(r['targets']) for r in self.records]
      self.grid = feature_grid(context.model, self.images.shape[1:])

  def can_draw(self, model) -> bool:
    if not getattr(model, 'heads', 0):
      logging.warning('no attention gifs: the model of task %s does not attend', self.context.task.name)
      return False
    return True

  def draw(self, index, record, tracked, step):
    del record
    attention_TxN = tracked['attention_BxTxN']
    grid = self.grid
    if attention_TxN.shape[-1] != grid[0] * grid[1]:
      raise ValueError(f'attention over {attention_TxN.shape[-1]} positions, not a {grid} map')
    self.draw_image(index, tracked, attention_TxN.reshape(-1, *grid), step)

  def draw_image(self, index: int, tracked: dict, attention_Txhxw, step: int):
    raise NotImplementedError


class AttentionGifs(TrackedGifs):
  """`attention_<step>_<i>.gif` for the first `count` held-out images: per tick,
  where the heads attend, the top classes' probabilities and the certainty."""

  def __init__(self, context: Context, count: int):
    num_top = min(5, context.model.out_dims)
    super().__init__(context, count, lambda model: make_attention_step(model, num_top))

  def draw_image(self, index, tracked, attention_Txhxw, step):
    plots.attention_gif(
        self.images[index],
        attention_Txhxw,
        tracked['top_probs_BxTxA'],
        tracked['top_classes_BxTxA'],
        tracked['certainty_BxT'],
        os.path.join(self.context.plot_dir, f'attention_{step:07d}_{index}.gif'),
        label=int(self.targets[index]),
        title=f'step {step}, eval image {index}: ',
    )
