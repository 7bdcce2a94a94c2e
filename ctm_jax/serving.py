"""Batched serving with per-example early exit and slot refill.

`model.apply(v, x, exit_threshold=th)` stops a batch when its least certain
example is done, so a batch costs its slowest example's ticks. A `Server`
keeps `slots` examples in flight instead: every tick runs all slots, an example
leaves its slot at its first tick with certainty >= the threshold (or after
`max_ticks`), and the next queued example takes the slot at once. Throughput
then follows the mean ticks per example, not the batch maximum.

All of it is one compiled program per queue length: the queue's inputs are
featurised in chunks of `slots` (backbone, key/value projections), then a
`lax.while_loop` ticks the slots until the queue is drained. Results are in
queue order and equal, example by example, what `exit_threshold` gives.

Dimension glossary: Q queue (examples served), S slots, O out_dims,
D neurons, M memory length, K heads, N tokens, F head width.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import compiling
from ctm_jax.models import ctm as ctm_lib


def _batch_axis(path) -> int:
  # The neuron-major trace keeps its batch last (axis 2); every other leaf of a
  # TickState or TickInputs leads with it.
  return 2 if 'trace_DxMxB' in jax.tree_util.keystr(path) else 0


def _take(tree, index_S):
  return jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.take(a, index_S, axis=_batch_axis(p)), tree
  )


def _select(mask_S, new, old):
  """Per slot: `new` where mask_S, else `old`."""

  def pick(path, a, b):
    axis = _batch_axis(path)
    shape = [1] * a.ndim
    shape[axis] = mask_S.shape[0]
    return jnp.where(mask_S.reshape(shape), a, b)

  return jax.tree_util.tree_map_with_path(pick, new, old)


def map_in_chunks(fn, inputs, size: int):
  """`fn` over a queue (leading axis Q) `size` examples at a time, in one
  `lax.map`: the queue is padded to a whole number of chunks with copies of
  its last example, and the padding's outputs are dropped."""
  queue = jax.tree.leaves(inputs)[0].shape[0]
  chunks = -(-queue // size)
  pad = chunks * size - queue

  def chunked(x):
    x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
    return x.reshape(chunks, size, *x.shape[1:])

  out = jax.lax.map(fn, jax.tree.map(chunked, inputs))
  return jax.tree.map(lambda a: a.reshape(chunks * size, *a.shape[2:])[:queue], out)


class Server:
  """`server(variables, inputs_Q, threshold)` -> ctm.EarlyExit over the Q
  queued examples; afterwards `server.rounds` is how many ticks the slots ran.

  `model` is a ContinuousThoughtMachine (any task whose inputs do not change
  over ticks); `slots` is how many examples tick at once; `max_ticks` defaults
  to the model's iterations (more than trained is allowed). The threshold is
  an argument of each call, so changing it does not recompile.
  """

  def __init__(self, model, *, slots: int = 64, max_ticks: int | None = None):
    if not isinstance(slots, int) or slots < 1:
      raise ValueError(f'slots={slots!r}: must be a positive integer')
    self.model = model
    self.slots = slots
    self.max_ticks = max_ticks or model.iterations
    if self.max_ticks < 1:
      raise ValueError(f'max_ticks={max_ticks!r}: must be a positive integer')
    self._serve = compiling.jit(self._serve_fn)

  def __call__(self, variables, inputs, threshold) -> ctm_lib.EarlyExit:
    result, self.rounds = self._serve(variables, inputs, jnp.asarray(threshold, jnp.float32))
    return result

  def _prepare(self, variables, inputs):
    """Every queued example's tick inputs, featurised `slots` at a time; the
    initial state is one example's (it does not depend on the input)."""

    def prepare(x):
      return self.model.apply(variables, x, prepare=True)

    first = prepare(jax.tree.map(lambda x: x[:1], inputs))
    fixed_Q = map_in_chunks(lambda x: prepare(x).fixed, inputs, self.slots)
    return first.state, fixed_Q, first.synch_params

  def _serve_fn(self, variables, inputs, threshold):
    model, slots, max_ticks = self.model, self.slots, self.max_ticks
    start_1, fixed_Q, synch_params = self._prepare(variables, inputs)
    queue = jax.tree.leaves(fixed_Q)[0].shape[0]
    tick = model.make_tick()
    tick_params = {'params': variables['params']['tick']}

    first_S = jnp.arange(slots, dtype=jnp.int32)
    example_S = jnp.where(first_S < queue, first_S, -1)  # -1: an empty slot
    carry = dict(
        state=_take(start_1, jnp.zeros((slots,), jnp.int32)),
        fixed=_take(fixed_Q, jnp.minimum(first_S, queue - 1)),
        example_S=example_S,
        ticks_S=jnp.zeros((slots,), jnp.int32),
        next=jnp.asarray(min(slots, queue), jnp.int32),
        predictions_QxO=jnp.zeros((queue, model.out_dims), jnp.float32),
        certainties_Qx2=jnp.zeros((queue, 2), jnp.float32),
        ticks_Q=jnp.zeros((queue,), jnp.int32),
        stopped_Q=jnp.zeros((queue,), bool),
        rounds=jnp.zeros((), jnp.int32),
    )

    def cond(c):
      return jnp.any(c['example_S'] >= 0)

    def body(c):
      state, out = tick.apply(tick_params, c['state'], ctm_lib.TickInputs(), c['fixed'], synch_params)
      ticks_S = c['ticks_S'] + 1
      active_S = c['example_S'] >= 0
      sure_S = out['certainties'][:, 1] >= threshold
      done_S = active_S & (sure_S | (ticks_S >= max_ticks))
      # Finished examples write their row; others write out of range (dropped).
      row_S = jnp.where(done_S, c['example_S'], queue)
      c = dict(
          c,
          predictions_QxO=c['predictions_QxO'].at[row_S].set(out['predictions'], mode='drop'),
          certainties_Qx2=c['certainties_Qx2'].at[row_S].set(out['certainties'], mode='drop'),
          ticks_Q=c['ticks_Q'].at[row_S].set(ticks_S, mode='drop'),
          stopped_Q=c['stopped_Q'].at[row_S].set(sure_S, mode='drop'),
      )
      # Refill: the k-th finished slot takes queued example next + k.
      incoming_S = c['next'] + jnp.cumsum(done_S) - 1
      refill_S = done_S & (incoming_S < queue)
      example_S = jnp.where(done_S, jnp.where(refill_S, incoming_S, -1), c['example_S'])

      def refill(args):
        state, fixed = args
        fresh_index_S = jnp.clip(incoming_S, 0, queue - 1)
        fresh_state = _take(start_1, jnp.zeros((slots,), jnp.int32))
        return (
            _select(refill_S, fresh_state, state),
            _select(refill_S, _take(fixed_Q, fresh_index_S), fixed),
        )

      state, fixed = jax.lax.cond(jnp.any(refill_S), refill, lambda a: a, (state, c['fixed']))
      return dict(
          c,
          state=state,
          fixed=fixed,
          example_S=example_S,
          ticks_S=jnp.where(done_S, 0, ticks_S),
          next=c['next'] + done_S.sum(dtype=jnp.int32),
          rounds=c['rounds'] + 1,
      )

    c = jax.lax.while_loop(cond, body, carry)
    result = ctm_lib.EarlyExit(
        c['predictions_QxO'], c['certainties_Qx2'], c['ticks_Q'], c['stopped_Q']
    )
    return result, c['rounds']


def batched(model, *, batch: int, max_ticks: int | None = None):
  """The no-refill baseline: `fn(variables, inputs_Q, threshold)` runs the
  queue in batches of `batch` with `exit_threshold`, each batch until its
  slowest example stops. Same outputs as a Server; for comparing throughput."""

  @compiling.jit
  def run(variables, inputs, threshold):
    return map_in_chunks(
        lambda x: model.apply(variables, x, exit_threshold=threshold, max_ticks=max_ticks),
        inputs,
        batch,
    )

  return lambda variables, inputs, threshold: run(
      variables, inputs, jnp.asarray(threshold, jnp.float32)
  )



class Slots:
  """Continuous batching for a live server: `slots` examples tick together,
  and examples join and leave at any tick, each with its own threshold and
  tick limit. The host drives it in rounds:

    carry = slots.empty(example_inputs_S)
    carry = slots.admit(carry, inputs_K, slots_K, threshold_K, limit_K)
    carry, done_S = slots.run(carry, rounds)
    history = slots.history(carry, done_slots)

  `admit` featurises the K arriving examples (only those, padded to one of a
  few compiled widths) and puts them into their slots (fresh state, tick 0). `run` ticks every slot
  until `need` busy ones have stopped (certainty >= its threshold, or its
  limit), none is busy, or `rounds` ticks have passed; stopped slots are
  free again. Each
  slot keeps its example's every tick (predictions, certainty, and with
  `trace` each head's attention) so a finished example's whole history
  leaves with it (`history`). Compiles once per input shape; thresholds,
  limits and rounds are arguments.

  Dimension glossary (also): T max ticks a slot may run; K examples admitted
  at once.
  """

  def __init__(self, model, variables, *, slots: int = 64, max_ticks: int | None = None, trace: bool = False):
    if not isinstance(slots, int) or slots < 1:
      raise ValueError(f'slots={slots!r}: must be a positive integer')
    self.model = model
    self.variables = variables
    self.slots = slots
    self.max_ticks = max_ticks or model.iterations
    if self.max_ticks < 1:
      raise ValueError(f'max_ticks={max_ticks!r}: must be a positive integer')
    self.trace = bool(trace) and bool(getattr(model, 'heads', 0))
    # The batch widths admit compiles for: powers of two below S, and S.
    self.admit_widths = tuple(1 << i for i in range((slots - 1).bit_length()) if 1 << i < slots) + (slots,)
    self._admit = compiling.jit(self._admit_fn, donate_argnums=1)
    self._run = compiling.jit(self._run_fn, donate_argnums=1)
    self._tick = model.make_tick(track=self.trace)

  def _prepared(self, variables, inputs_S):
    return self.model.apply(variables, inputs_S, prepare=True)

  def empty(self, example_inputs_S):
    """A carry with every slot free, for inputs shaped as `example_inputs_S`
    (S examples: their values are not used)."""
    # Built by a compiled program, as admit's and run's carries are: arrays of
    # one kind, so each of those compiles once.
    return compiling.jit(self._empty_fn)(self.variables, example_inputs_S)

  def _empty_fn(self, variables, example_inputs_S):
    prepared = self._prepared(variables, example_inputs_S)
    slots, ticks, out_dims = self.slots, self.max_ticks, self.model.out_dims
    carry = dict(
        # The synchronisation's pairs and decays are the model's, not the input's.
        synch_params=prepared.synch_params,
        state=jax.tree.map(jnp.zeros_like, prepared.state),
        fixed=jax.tree.map(jnp.zeros_like, prepared.fixed),
        ticks_S=jnp.zeros((slots,), jnp.int32),
        busy_S=jnp.zeros((slots,), bool),
        sure_S=jnp.zeros((slots,), bool),
        threshold_S=jnp.zeros((slots,), jnp.float32),
        limit_S=jnp.zeros((slots,), jnp.int32),
        predictions_SxTxO=jnp.zeros((slots, ticks, out_dims), jnp.float32),
        certainty_SxT=jnp.zeros((slots, ticks), jnp.float32),
    )
    if self.trace:
      _, heads, positions, _ = prepared.fixed.keys_BxKxNxF.shape
      carry['attention_SxTxKxN'] = jnp.zeros((slots, ticks, heads, positions), jnp.float32)
    return carry

  def admit(self, carry, inputs_K, slots_K, threshold_K, limit_K):
    """`carry` with K examples `inputs_K` in slots `slots_K` (host ints, each
    free and distinct), thresholds `threshold_K` and tick limits `limit_K`
    (<= max_ticks). Only the K examples are featurised, padded to the next
    width in `admit_widths` (one compiled program each); the padding's rows
    are dropped. One padded call costs less than a call per power of two in
    K: a call's fixed cost is that of a few examples (docs/serving.md)."""
    slots_K = np.asarray(slots_K, np.int32).reshape(-1)
    count = len(slots_K)
    if not count:
      return carry
    width = min(w for w in self.admit_widths if w >= count)
    pad = width - count
    inputs_K = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x, inputs_K)
    # An index past the last slot drops the padding's rows.
    index_K = np.concatenate([slots_K, np.full(pad, self.slots, np.int32)])
    threshold_K = np.concatenate([np.broadcast_to(np.asarray(threshold_K, np.float32), (count,)), np.zeros(pad, np.float32)])
    limit_K = np.concatenate([np.broadcast_to(np.asarray(limit_K, np.int32), (count,)), np.ones(pad, np.int32)])
    return self._admit(self.variables, carry, inputs_K, index_K, threshold_K, limit_K)

  def compile_admit(self, carry, example_inputs):
    """Compiles admit for every width in `admit_widths` (one example, no batch
    axis, as the model reads) ahead of use; returns the carry, unchanged in
    what it holds."""
    for width in self.admit_widths:
      # Every row dropped (index S): the carry's slots are left as they were.
      inputs_K = jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], width, axis=0), example_inputs)
      carry = self._admit(
          self.variables, carry, inputs_K, np.full(width, self.slots, np.int32),
          np.zeros(width, np.float32), np.ones(width, np.int32),
      )
    return carry

  def _admit_fn(self, variables, carry, inputs_K, index_K, threshold_K, limit_K):
    prepared = self._prepared(variables, inputs_K)

    def put(path, old, new):
      axis = _batch_axis(path)
      moved = jnp.moveaxis(old, axis, 0).at[index_K].set(jnp.moveaxis(new, axis, 0), mode='drop')
      return jnp.moveaxis(moved, 0, axis)

    set_K = lambda a, v: a.at[index_K].set(v, mode='drop')  # noqa: E731
    return dict(
        carry,
        state=jax.tree_util.tree_map_with_path(put, carry['state'], prepared.state),
        fixed=jax.tree_util.tree_map_with_path(put, carry['fixed'], prepared.fixed),
        ticks_S=set_K(carry['ticks_S'], 0),
        busy_S=set_K(carry['busy_S'], True),
        sure_S=set_K(carry['sure_S'], False),
        threshold_S=set_K(carry['threshold_S'], threshold_K),
        limit_S=set_K(carry['limit_S'], jnp.clip(limit_K, 1, self.max_ticks)),
        **{k: set_K(carry[k], 0) for k in carry if k.endswith(('SxTxO', 'SxT', 'SxTxKxN'))},
        synch_params=prepared.synch_params,
    )

  def run(self, carry, rounds: int, need: int = 1):
    """(carry, done_S): ticks until `need` busy slots have stopped, none is
    busy, or `rounds` ticks; done_S marks the slots that stopped (free now).
    A larger `need` makes fewer, longer rounds (less host work per example)."""
    carry, done_S = self._run(self.variables, carry, jnp.asarray(rounds, jnp.int32), jnp.asarray(need, jnp.int32))
    return carry, done_S

  def _run_fn(self, variables, carry, rounds, need):
    tick_params = {'params': variables['params']['tick']}
    slots = self.slots
    rows_S = jnp.arange(slots)

    def cond(loop):
      t, c, done_S = loop
      return (t < rounds) & jnp.any(c['busy_S']) & (done_S.sum() < need)

    def body(loop):
      t, c, done_S = loop
      state, out = self._tick.apply(tick_params, c['state'], ctm_lib.TickInputs(), c['fixed'], c['synch_params'])
      busy_S = c['busy_S']
      # Free slots tick too (one program for all); their rows are not written.
      at_S = jnp.where(busy_S, c['ticks_S'], self.max_ticks)
      certainty_S = out['certainties'][:, 1].astype(jnp.float32)
      new = dict(
          predictions_SxTxO=c['predictions_SxTxO'].at[rows_S, at_S].set(
              out['predictions'].astype(jnp.float32), mode='drop'
          ),
          certainty_SxT=c['certainty_SxT'].at[rows_S, at_S].set(certainty_S, mode='drop'),
      )
      if self.trace:
        attention_SxKxN = out['attention'][:, :, 0, :].astype(jnp.float32)
        new['attention_SxTxKxN'] = c['attention_SxTxKxN'].at[rows_S, at_S].set(attention_SxKxN, mode='drop')
      ticks_S = jnp.where(busy_S, c['ticks_S'] + 1, c['ticks_S'])
      sure_S = certainty_S >= c['threshold_S']
      stop_S = busy_S & (sure_S | (ticks_S >= c['limit_S']))
      c = dict(
          c,
          **new,
          state=state,
          ticks_S=ticks_S,
          busy_S=busy_S & ~stop_S,
          sure_S=jnp.where(stop_S, sure_S, c['sure_S']),
      )
      return t + 1, c, done_S | stop_S

    _, carry, done_S = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), carry, jnp.zeros((slots,), bool))
    )
    return carry, done_S

  def history(self, carry, slots_K) -> list[dict]:
    """Per slot in `slots_K` (host ints): its example's `ticks` used, whether
    it was `sure` (reached its threshold), and every tick's `predictions_TxO`,
    `certainty_T` (and each head's `attention_TxKxN` with `trace`), up to its
    stopping tick."""
    count = len(slots_K)
    if not count:
      return []
    # Gathered by one compiled program per power of two, not one per count.
    width = 1 << (count - 1).bit_length()
    index_K = np.asarray(list(slots_K) + [slots_K[0]] * (width - count), np.int32)
    got = jax.device_get(self._gather(carry, index_K))
    out = []
    for i in range(count):
      ticks = int(got['ticks_S'][i])
      row = {'ticks': ticks, 'sure': bool(got['sure_S'][i])}
      for k in ('predictions_SxTxO', 'certainty_SxT', 'attention_SxTxKxN'):
        if k in got:
          row[k.replace('SxT', 'T')] = got[k][i][:ticks]
      out.append(row)
    return out

  def compile_history(self, carry) -> None:
    """Compiles `history`'s gathers (one per power of two up to S) ahead of use."""
    width = 1
    while True:
      jax.block_until_ready(self._gather(carry, np.zeros(width, np.int32)))
      if width >= self.slots:
        return
      width *= 2

  @functools.partial(jax.jit, static_argnums=0)
  def _gather(self, carry, index_K):
    keys = ('predictions_SxTxO', 'certainty_SxT', 'attention_SxTxKxN', 'ticks_S', 'sure_S')
    return {k: carry[k][index_K] for k in keys if k in carry}
