"""Serve a trained CTM over HTTP, requests from every client batched together.

  python -m ctm_jax.serve --workdir=RUN|ARTEFACT|IMPORT|hf://ORG/NAME
      [--host=127.0.0.1] [--port=8080] [--slots=64] [--threshold=0.9]
      [--max_ticks=N] [--max_wait_ms=5] [--max_pending=1024]

`POST /v1/predict` with `{"input": ..., "threshold": t, "max_ticks": n,
"trace": false}`: `input` is what `python -m ctm_jax.predict --input` reads as
text for the task (parity bits, sort numbers, brackets), or
`{"png_base64": ...}` / `{"npy_base64": ...}` for pictures and arrays. The
answer: `answer`, `prediction` (the output vector at the stopping tick),
`certainty`, `ticks_used`, `ticks` (certainty and answer per tick), `exit`
('threshold' or 'max_ticks'); `trace` adds `attention` (per tick, averaged
over heads). `GET /healthz`, `GET /v1/model`, `GET /metrics` (Prometheus).

Every request joins one continuous batch (`serving.Slots`): it waits at most
--max_wait_ms for others to arrive, leaves its slot at its own stopping tick,
and the next request takes the slot at once. A bad request is answered 4xx
with `{"error": "<one line naming the field and the fix>"}`; SIGTERM stops
accepting, finishes the requests in flight and exits 0.

Starlette + uvicorn (the `serve` extra): the ASGI stack FastAPI is built on,
without its pydantic layer, since requests are checked here field by field to
give one-line errors.
"""

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np

from ctm_jax import extras
from ctm_jax import inference
from ctm_jax import serving
from ctm_jax import tasks
from ctm_jax import validation

MAX_BODY_BYTES = 8 << 20  # a picture or a maze, base64'd, with room to spare
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_FIELDS = ('input', 'threshold', 'max_ticks', 'trace')
INLINE_ANSWER_TICKS = 128  # an answer of more ticks is built off the event loop (it would stall other requests)
PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'page')  # the page's static files


class BadRequest(ValueError):
  """A request the client can fix: `status` and one line."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class _Pending:
  inputs: np.ndarray  # one example, no batch axis
  threshold: float
  limit: int
  future: concurrent.futures.Future
  arrived: float


class Engine:
  """The continuous batch: a thread that admits pending requests into free
  slots and ticks them (`serving.Slots`); `submit` returns a future of the
  request's history (`Slots.history`'s row)."""

  def __init__(self, model, variables, *, slots=64, max_ticks=None, max_wait_ms=5.0, max_pending=1024):
    self.slots = serving.Slots(model, variables, slots=slots, max_ticks=max_ticks, trace=True)
    self.max_ticks = self.slots.max_ticks
    self.max_wait_s = max_wait_ms / 1000
    self.max_pending = max_pending
    self.input_shape = None  # set by the first request: every example must match it
    self._pending = collections.deque()
    self._owner = [None] * slots
    self._lock = threading.Condition()
    self._stopping = False
    self._carry = None
    self.busy = 0
    self._thread = threading.Thread(target=self._loop, name='ctm-engine', daemon=True)
    self._thread.start()

  def submit(self, inputs, threshold: float, limit: int) -> concurrent.futures.Future:
    with self._lock:
      if self._stopping:
        raise BadRequest('the server is shutting down; retry on another', 503)
      if self.input_shape is not None and inputs.shape != self.input_shape:
        raise BadRequest(f'input: reads as {inputs.shape}, the model here serves {self.input_shape}')
      if len(self._pending) >= self.max_pending:
        raise BadRequest(f'too many pending requests ({self.max_pending}); retry later', 429)
      self.input_shape = inputs.shape
      future = concurrent.futures.Future()
      self._pending.append(_Pending(inputs, threshold, limit, future, time.perf_counter()))
      self._lock.notify()
      return future

  def stop(self) -> None:
    """Finishes what is pending and in flight, then ends the thread."""
    with self._lock:
      self._stopping = True
      self._lock.notify()
    self._thread.join()

  def warm_up(self, inputs) -> None:
    """Compiles admit and run for `inputs`' shape (one example) before clients come."""
    self.submit(inputs, 2.0, 1).result()

  def _take(self):
    """Under the lock: waits for work, then moves pending requests into free
    slots. Returns [(slot, request)], or None when stopped and drained."""
    while True:
      in_flight = any(o is not None for o in self._owner)
      if not in_flight and not self._pending:
        if self._stopping:
          return None
        self._lock.wait()
        continue
      free = [s for s, o in enumerate(self._owner) if o is None]
      if not in_flight and self._pending and len(self._pending) < len(free) and not self._stopping:
        # Idle: wait a few ms for more requests to share the first ticks.
        left = self._pending[0].arrived + self.max_wait_s - time.perf_counter()
        if left > 0:
          self._lock.wait(left)
          continue
      taken = []
      while free and self._pending:
        slot = free.pop(0)
        request = self._pending.popleft()
        self._owner[slot] = request
        taken.append((slot, request))
      return taken

  def _loop(self):
    slots = self.slots
    width = slots.slots
    while True:
      with self._lock:
        taken = self._take()
      if taken is None:
        return
      try:
        if taken:
          if self._carry is None:
            example = taken[0][1].inputs
            self._carry = slots.empty(np.repeat(example[None], width, axis=0))
            self._carry = slots.compile_admit(self._carry, example)
            slots.compile_history(self._carry)
          self._carry = slots.admit(
              self._carry,
              np.stack([request.inputs for _, request in taken]),
              [slot for slot, _ in taken],
              [request.threshold for _, request in taken],
              [request.limit for _, request in taken],
          )
        self.busy = sum(o is not None for o in self._owner)
        with self._lock:
          waiting = len(self._pending)
        if waiting and self.busy < width:  # free slots and requests waiting: they join at the next tick
          rounds, need = 1, 1
        elif waiting:  # a backlog: answer a quarter of the slots a round, so host work is per batch
          rounds, need = self.max_ticks, max(1, min(waiting, self.busy) // 4)
        else:  # nobody waits: each answer as soon as it is ready
          rounds, need = self.max_ticks, 1
        self._carry, done_S = slots.run(self._carry, rounds, need)
        done = np.flatnonzero(np.asarray(done_S)).tolist()
        histories = slots.history(self._carry, done) if done else []
      except Exception as e:  # pylint: disable=broad-except  # every waiting client hears of it
        with self._lock:
          failed = [o for o in self._owner if o is not None]
          self._owner = [None] * width
          self._carry = None
        for request in failed:
          request.future.set_exception(e)
        continue
      with self._lock:
        for slot, history in zip(done, histories):
          request, self._owner[slot] = self._owner[slot], None
          request.future.set_result(history)
        self.busy = sum(o is not None for o in self._owner)


class Metrics:
  """Counters and histograms for `GET /metrics`, in Prometheus' text format."""

  def __init__(self):
    self.lock = threading.Lock()
    self.requests = collections.Counter()  # status -> count
    self.latency = [0] * (len(LATENCY_BUCKETS_S) + 1)
    self.latency_sum = 0.0
    self.ticks = collections.Counter()
    self.ticks_sum = 0
    self.in_flight = 0  # predict requests being read, waiting, ticking or answered but not yet sent

  def in_flight_change(self, change: int) -> None:
    with self.lock:
      self.in_flight += change

  def observe(self, status: int, seconds: float, ticks: int | None = None) -> None:
    with self.lock:
      self.requests[status] += 1
      self.latency[next((i for i, b in enumerate(LATENCY_BUCKETS_S) if seconds <= b), len(LATENCY_BUCKETS_S))] += 1
      self.latency_sum += seconds
      if ticks is not None:
        self.ticks[ticks] += 1
        self.ticks_sum += ticks

  def text(self, busy: int, slots: int, pending: int) -> str:
    with self.lock:
      lines = ['# HELP ctm_requests_total Predict requests answered, by HTTP status.', '# TYPE ctm_requests_total counter']
      lines += [f'ctm_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
      errors = sum(n for s, n in self.requests.items() if s >= 400)
      lines += ['# HELP ctm_errors_total Predict requests answered with an error.', '# TYPE ctm_errors_total counter',
                f'ctm_errors_total {errors}']
      lines += ['# HELP ctm_request_seconds Predict latency.', '# TYPE ctm_request_seconds histogram']
      total = 0
      for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), self.latency):
        total += count
        lines.append(f'ctm_request_seconds_bucket{{le="{"+Inf" if bound == math.inf else bound}"}} {total}')
      lines += [f'ctm_request_seconds_sum {self.latency_sum:.6f}', f'ctm_request_seconds_count {total}']
      lines += ['# HELP ctm_ticks_used Ticks each answered request ran.', '# TYPE ctm_ticks_used histogram']
      total = 0
      for ticks in sorted(self.ticks):
        total += self.ticks[ticks]
        lines.append(f'ctm_ticks_used_bucket{{le="{ticks}"}} {total}')
      lines += [f'ctm_ticks_used_bucket{{le="+Inf"}} {total}', f'ctm_ticks_used_sum {self.ticks_sum}',
                f'ctm_ticks_used_count {total}']
    lines += ['# HELP ctm_slots_busy Slots holding a request now.', '# TYPE ctm_slots_busy gauge', f'ctm_slots_busy {busy}',
              '# HELP ctm_slots Slots in the continuous batch.', '# TYPE ctm_slots gauge', f'ctm_slots {slots}',
              '# HELP ctm_pending Requests waiting for a slot.', '# TYPE ctm_pending gauge', f'ctm_pending {pending}',
              '# HELP ctm_in_flight Predict requests received and not yet answered.', '# TYPE ctm_in_flight gauge',
              f'ctm_in_flight {self.in_flight}']
    return '\n'.join(lines) + '\n'


def parse_request(body: bytes, default_threshold: float, max_ticks: int) -> dict:
  """The checked fields of a predict body; BadRequest naming the field otherwise."""
  if len(body) > MAX_BODY_BYTES:
    raise BadRequest(f'body: {len(body)} bytes, over the {MAX_BODY_BYTES} a request may be; send one example', 413)
  try:
    request = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BadRequest(f'body: not JSON ({e}); send {{"input": ...}}') from None
  if not isinstance(request, dict):
    raise BadRequest(f'body: a JSON {type(request).__name__}; send an object {{"input": ...}}')
  unknown = sorted(set(request) - set(REQUEST_FIELDS))
  if unknown:
    raise BadRequest(f'{unknown[0]}: not a field; the fields are {", ".join(REQUEST_FIELDS)}')
  if 'input' not in request:
    raise BadRequest('input: missing; send the input as text, or {"png_base64": ...} or {"npy_base64": ...}')
  threshold = request.get('threshold', default_threshold)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
    raise BadRequest(f'threshold: {threshold!r}; a certainty in (0, 1] (above 1: run every tick)')
  ticks = request.get('max_ticks', max_ticks)
  if isinstance(ticks, bool) or not isinstance(ticks, int) or not 1 <= ticks <= max_ticks:
    raise BadRequest(f'max_ticks: {ticks!r}; an integer from 1 to {max_ticks} (the server\'s --max_ticks)')
  trace = request.get('trace', False)
  if not isinstance(trace, bool):
    raise BadRequest(f'trace: {trace!r}; true or false')
  return dict(input=request['input'], threshold=float(threshold), max_ticks=ticks, trace=trace)


def read_payload(task, config, payload) -> dict:
  """The task's batch of one from a request's `input`: text is read as the
  task reads a text file, pictures and arrays from their bytes; nothing the
  client names is opened (each lands in a private file first)."""
  if isinstance(payload, str):
    name, data = 'input.txt', payload.encode()
  elif isinstance(payload, dict) and len(payload) == 1 and next(iter(payload)) in ('png_base64', 'npy_base64'):
    (key, text), = payload.items()
    if not isinstance(text, str):
      raise BadRequest(f'input.{key}: a {type(text).__name__}; send the file\'s bytes as a base64 string')
    try:
      data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
      raise BadRequest(f'input.{key}: not base64; send the file\'s bytes base64-encoded') from None
    name = 'input.png' if key == 'png_base64' else 'input.npy'
  else:
    raise BadRequest('input: send text, {"png_base64": "..."} or {"npy_base64": "..."}')
  with tempfile.TemporaryDirectory(prefix='ctm_serve_') as folder:
    path = os.path.join(folder, name)
    with open(path, 'wb') as f:
      f.write(data)
    try:
      batch = task.read_input(config, path)
      tasks.check_finite(batch, path)
    except ValueError as e:
      field = 'input' if name == 'input.txt' else f'input.{name[len("input."):]}_base64'
      raise BadRequest(str(e).replace(f'--input={path}', field).replace(path, field)) from None
  inputs = batch['inputs']
  if not isinstance(inputs, np.ndarray):
    raise BadRequest(f'input: task {config.task!r} reads inputs that change over the ticks; the server ticks fixed ones')
  return batch


def output_classes(model) -> int:
  """The classes each row of the model's output reads as (its prediction_reshaper's last axis)."""
  last = int(model.prediction_reshaper[-1])
  return last if last > 0 else model.out_dims


def probabilities(predictions_TxO, classes: int) -> np.ndarray:
  """(T, O / classes, classes): each tick's output as the loss reads it, a
  softmax over the last axis of the model's prediction_reshaper."""
  logits = np.asarray(predictions_TxO, np.float64).reshape(len(predictions_TxO), -1, classes)
  logits = logits - logits.max(axis=-1, keepdims=True)
  weights = np.exp(logits)
  return weights / weights.sum(axis=-1, keepdims=True)


def answer(task, config, history: dict, trace: bool, classes: int, inputs=None) -> dict:
  """The response to a predict request from its slot's history; `trace` adds
  what the page draws: every tick's attention per head (`attention`: T x K x
  N) and class probabilities (`probabilities`: T x rows x classes), and the
  model input it read (`input`), and where each tick's answer walks on it
  (`paths`, for a maze's route)."""
  predictions_TxO = history['predictions_TxO']
  ticks = history['ticks']
  result = {
      'answer': task.describe(config, predictions_TxO[ticks - 1]),
      'prediction': predictions_TxO[ticks - 1].tolist(),
      'certainty': float(history['certainty_T'][ticks - 1]),
      'ticks_used': ticks,
      'ticks': [
          {'certainty': float(c), 'answer': task.describe(config, p)}
          for c, p in zip(history['certainty_T'], predictions_TxO)
      ],
      'exit': 'threshold' if history['sure'] else 'max_ticks',
  }
  if trace:
    if 'attention_TxKxN' in history:
      result['attention'] = np.round(history['attention_TxKxN'], 5).tolist()
    result['probabilities'] = np.round(probabilities(predictions_TxO, classes), 5).tolist()
    if inputs is not None:
      result['input'] = np.round(np.asarray(inputs, np.float64), 4).tolist()
      paths = [task.trace_path(config, inputs, p) for p in predictions_TxO]
      if any(p is not None for p in paths):
        result['paths'] = paths
  return result


def model_summary(model, variables, config, task, workdir: str, engine: Engine, threshold: float) -> dict:
  parameters = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables.get('params', {})))
  return {
      'workdir': workdir,
      'task': config.task,
      'model': type(model).__name__,
      'ticks_trained': int(model.iterations),
      'max_ticks': engine.max_ticks,
      'slots': engine.slots.slots,
      'threshold': threshold,
      'parameters': parameters,
      'input_shape': None if engine.input_shape is None else list(engine.input_shape),
      'generates': getattr(type(task), 'fresh_example', None) not in (None, tasks.Predicts.fresh_example),
      'config': model_fields(model),
  }


def model_fields(model) -> dict:
  fields = ('d_model', 'd_input', 'heads', 'iterations', 'memory_length', 'n_synch_out', 'n_synch_action',
            'out_dims', 'backbone_type')
  return {f: getattr(model, f) for f in fields if isinstance(getattr(model, f, None), (int, float, str))}


def _example(task, config):
  """One model input of the task's shape (no batch axis), or None where the
  config cannot make one (an import without the task's data fields)."""
  try:
    inputs = task.model_inputs(task.synthetic_batch(config, 1, seed=0))
  except Exception:  # pylint: disable=broad-except  # then the first request compiles instead
    return None
  return np.asarray(inputs)[0] if isinstance(inputs, np.ndarray) else None


def _grid(model, input_shape):
  """[h, w] of the map an image model attends over; None for a sequence."""
  if len(input_shape) != 3:
    return None
  from ctm_jax import evaluators  # pylint: disable=g-import-not-at-top

  try:
    return list(evaluators.feature_grid(model, input_shape))
  except ValueError:
    return None


def _query_int(params, name: str, default: int, low: int, high: int) -> int:
  text = params.get(name)
  if text is None:
    return default
  if not text.isdigit() or not low <= int(text) <= high:
    raise BadRequest(f'{name}: {text!r}; an integer from {low} to {high}')
  return int(text)


def held_out_examples(task, config, count: int, seed: int, fresh: bool = False) -> list[dict]:
  """`count` consecutive held-out records from index `seed` (the task's eval
  source; its generator where the config has no data, as an import's), each
  as a request's `input` ({"npy_base64": ...}) with its `label` where it has
  one (a class, or a list: parity's bits, a maze's route). `fresh`: new
  examples from the task's generator instead (`Task.fresh_example`, seeds
  `seed`, `seed + 1`, ...)."""
  try:
    if fresh:
      made = [task.fresh_example(config, seed + i) for i in range(count)]
      if made[0] is None:
        raise BadRequest(f'generate: task {config.task!r} generates no examples; ask for held-out ones', 404)
      batch = {k: np.concatenate([m[k] for m in made]) for k in made[0]}
    else:
      try:
        source = task.eval_source(config)
        records = [source[(seed + i) % len(source)] for i in range(count)]
        batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
      except Exception:  # pylint: disable=broad-except  # no data here: the task's generator
        batch = task.synthetic_batch(config, count, seed=seed)
    inputs = task.model_inputs(batch)
  except BadRequest:
    raise
  except Exception as e:  # pylint: disable=broad-except  # an import lacks the task's data fields
    raise BadRequest(f'examples: task {config.task!r} has no examples for this model ({e})', 404) from None
  if not isinstance(inputs, np.ndarray):
    raise BadRequest(f'examples: task {config.task!r} reads inputs that change over the ticks', 404)
  targets = np.asarray(batch.get('targets', np.zeros(0)))
  out = []
  for i in range(count):
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(inputs[i], np.float32))
    example = {'input': {'npy_base64': base64.b64encode(buffer.getvalue()).decode()}}
    if targets.ndim >= 1 and len(targets) == count:
      example['label'] = targets[i].tolist()
    out.append(example)
  return out


def load(workdir: str, max_ticks: int | None):
  """(model, variables, config, task) for serving; UsageError naming what cannot be served."""
  if max_ticks is not None and max_ticks < 1:
    raise validation.UsageError(f'--max_ticks={max_ticks}: must be a positive integer')
  model, variables, config = inference.from_pretrained(workdir)
  task = tasks.get(config.task)
  servable = isinstance(task, tasks.Predicts) and hasattr(model, 'make_tick')
  if servable:
    try:  # the model's own inputs: inputs that change over the ticks cannot sit in a slot
      inputs = task.model_inputs(task.synthetic_batch(config, 1, seed=0))
    except Exception:  # pylint: disable=broad-except  # an import without the task's data fields
      inputs = None
    servable = inputs is None or isinstance(inputs, np.ndarray)
  if not servable:
    raise validation.UsageError(
        f'--workdir={workdir}: a {config.task!r} {type(model).__name__}, which the server cannot tick '
        '(it serves CTMs whose inputs stay fixed over the ticks); use python -m ctm_jax.predict'
    )
  return model, variables, config, task


def make_app(model, variables, config, task, *, workdir='', slots=64, threshold=0.9, max_ticks=None,
             max_wait_ms=5.0, max_pending=1024):
  """The ASGI app: its engine starts with the app's lifespan and drains at shutdown."""
  extras.require('serve', 'ctm_jax.serve.make_app')
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.responses import JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.responses import PlainTextResponse  # pylint: disable=g-import-not-at-top
  from starlette.responses import FileResponse  # pylint: disable=g-import-not-at-top
  from starlette.routing import Mount  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top
  from starlette.staticfiles import StaticFiles  # pylint: disable=g-import-not-at-top

  metrics = Metrics()
  state = {}
  classes = output_classes(model)

  def error(e: BadRequest, started: float):
    metrics.observe(e.status, time.perf_counter() - started)
    return JSONResponse({'error': str(e)}, status_code=e.status)

  async def predict(request):
    metrics.in_flight_change(1)
    try:
      return await answer_request(request)
    finally:  # answered, refused, failed or dropped by the client
      metrics.in_flight_change(-1)

  async def answer_request(request):
    started = time.perf_counter()
    engine = state['engine']
    try:
      length = request.headers.get('content-length')
      if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise BadRequest(f'body: {length} bytes, over the {MAX_BODY_BYTES} a request may be; send one example', 413)
      body = bytearray()
      async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
          raise BadRequest(f'body: over the {MAX_BODY_BYTES} bytes a request may be; send one example', 413)
      fields = parse_request(bytes(body), threshold, engine.max_ticks)
      batch = await asyncio.to_thread(read_payload, task, config, fields['input'])
      future = engine.submit(batch['inputs'][0], fields['threshold'], fields['max_ticks'])
      history = await asyncio.wrap_future(future)
      if fields['trace'] or history['ticks'] > INLINE_ANSWER_TICKS:  # long lists: off the event loop
        inputs = batch['inputs'][0] if fields['trace'] else None
        result = await asyncio.to_thread(answer, task, config, history, fields['trace'], classes, inputs)
      else:  # a few short lists: cheaper here than a thread hop
        result = answer(task, config, history, False, classes)
    except BadRequest as e:
      return error(e, started)
    metrics.observe(200, time.perf_counter() - started, result['ticks_used'])
    return JSONResponse(result)

  async def healthz(_):
    return JSONResponse({'status': 'ok'})

  async def describe_model(_):
    summary = model_summary(model, variables, config, task, workdir, state['engine'], threshold)
    summary['attention_grid'] = state.get('grid')
    return JSONResponse(summary)

  async def page(_):
    return FileResponse(os.path.join(PAGE_DIR, 'index.html'))

  async def examples(request):
    started = time.perf_counter()
    try:
      count = _query_int(request.query_params, 'count', 1, 1, 16)
      seed = _query_int(request.query_params, 'seed', 0, 0, 2**31 - 1)
      fresh = _query_int(request.query_params, 'generate', 0, 0, 1) == 1
      got = await asyncio.to_thread(held_out_examples, task, config, count, seed, fresh)
    except BadRequest as e:
      return error(e, started)
    return JSONResponse({'examples': got})

  async def prometheus(_):
    engine = state['engine']
    return PlainTextResponse(
        metrics.text(engine.busy, engine.slots.slots, len(engine._pending)),  # pylint: disable=protected-access
        media_type='text/plain; version=0.0.4',
    )

  @contextlib.asynccontextmanager
  async def lifespan(_):
    engine = state['engine'] = Engine(
        model, variables, slots=slots, max_ticks=max_ticks, max_wait_ms=max_wait_ms, max_pending=max_pending
    )
    example = _example(task, config)
    if example is not None:  # compiles before the first client, and fixes the input shape
      await asyncio.to_thread(engine.warm_up, example)
      state['grid'] = _grid(model, example.shape)
    try:
      yield
    finally:
      await asyncio.to_thread(state['engine'].stop)

  return Starlette(
      routes=[
          Route('/v1/predict', predict, methods=['POST']),
          Route('/healthz', healthz),
          Route('/v1/model', describe_model),
          Route('/metrics', prometheus),
          Route('/v1/examples', examples),
          Route('/', page),
          Mount('/page', StaticFiles(directory=PAGE_DIR), name='page'),
      ],
      lifespan=lifespan,
  )


def _run(values):
  extras.require('serve', 'python -m ctm_jax.serve')
  import uvicorn  # pylint: disable=g-import-not-at-top
  if values.slots < 1:
    raise validation.UsageError(f'--slots={values.slots}: must be a positive integer')
  if not 0 < values.threshold:
    raise validation.UsageError(f'--threshold={values.threshold}: a certainty in (0, 1] (above 1: every tick)')
  if not 0 < values.port < 65536:
    raise validation.UsageError(f'--port={values.port}: a TCP port, 1-65535')
  model, variables, config, task = load(values.workdir, values.max_ticks)
  app = make_app(
      model, variables, config, task, workdir=values.workdir, slots=values.slots, threshold=values.threshold,
      max_ticks=values.max_ticks, max_wait_ms=values.max_wait_ms, max_pending=values.max_pending,
  )
  server = uvicorn.Server(
      uvicorn.Config(app, host=values.host, port=values.port, log_level='warning', timeout_graceful_shutdown=30)
  )
  # uvicorn drains on SIGTERM / SIGINT, then raises the signal again for the
  # handler it found: this one, so that a drained server exits 0.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  print(f'serving {config.task} from {values.workdir} on http://{values.host}:{values.port}/', flush=True)
  server.run()
  if not server.started:
    raise validation.UsageError(f'--port={values.port}: cannot listen on {values.host}:{values.port} (in use?)')


def free_port() -> int:
  """A loopback TCP port no one listens on now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class ChildFailed(RuntimeError):
  """A `Child` server that exited, or did not answer in time, before serving."""

  def __init__(self, why: str, log: str):
    lines = log.strip().splitlines()
    self.why, self.log, self.last_line = why, log, lines[-1] if lines else ''
    super().__init__(f'the server {why}: {log[-2000:].strip()}')


class Child:
  """`python -m ctm_jax.serve --workdir=WORKDIR --port=<free> FLAGS` in a child
  process, returned once `/healthz` answers (benchmarks, tools, tests). Its
  output goes to a temporary file (`log`), not a pipe that could fill;
  `stop()` sends SIGTERM and returns the exit code."""

  def __init__(self, workdir: str, *flags: str, timeout: float = 180.0, cwd: str | None = None):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._log = tempfile.TemporaryFile('w+')
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'ctm_jax.serve', f'--workdir={workdir}', f'--port={self.port}', *flags],
        cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + timeout
    while self.process.poll() is None and time.time() < deadline:
      try:
        with urllib.request.urlopen(self.url + '/healthz', timeout=1) as reply:
          if reply.status == 200:
            return
      except (urllib.error.URLError, OSError):
        time.sleep(0.3)
    exited = self.process.poll() is not None
    self.stop()
    raise ChildFailed('exited' if exited else f'did not answer within {timeout:g} s', self.log())

  def log(self) -> str:
    """Everything the server printed so far."""
    self._log.flush()
    self._log.seek(0)
    return self._log.read()

  def stop(self, timeout: float = 60.0) -> int:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    return self.process.returncode


def run():
  """`ctm-serve`, the same as `python -m ctm_jax.serve`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'A training run, an exported artefact, an import or hf://ORG/NAME.', required=True)
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
  flags.DEFINE_integer('port', 8080, 'Port to listen on.')
  flags.DEFINE_integer('slots', 64, 'Examples ticking at once (the continuous batch).')
  flags.DEFINE_float('threshold', 0.9, 'Default certainty to stop at (above 1: every tick).')
  flags.DEFINE_integer('max_ticks', None, 'Most ticks a request may run (default: as trained).')
  flags.DEFINE_float('max_wait_ms', 5.0, 'How long an idle server waits for a batch to form.')
  flags.DEFINE_integer('max_pending', 1024, 'Requests that may wait for a slot; more are refused (429).')
  app.run(validation.command('ctm_jax.serve', _run))


if __name__ == '__main__':
  run()
