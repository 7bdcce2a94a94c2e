"""The HTTP server under load: throughput and latency, early exit against every
tick and against one request at a time.

Usage (from the repo root):
  python -m benchmarks.serve_bench --workdir=RUN [--clients=128] [--requests=512]
      [--slots=64] [--threshold=0.9] [--timeout=600] [--json=PATH]

Starts `python -m ctm_jax.serve` on loopback (a free port) and sends the run's
first --requests held-out records (`GET /v1/examples`) from --clients
concurrent clients (each sends its next request when its last is answered;
twice the slots by default, so that slots freed early find work), three ways:
  early exit     --slots slots, each request at --threshold;
  every tick     the same server, each request at threshold 2 (never sure);
  one at a time  a server with one slot and one client at --threshold.
Then the first two again on the engine in this process (`serve.Engine`, no
HTTP, inputs read beforehand): what the continuous batch itself serves.
For each: requests/s over the whole load, p50 and p99 latency, mean ticks and
accuracy (the task's own `correct` on each answer's output at its stopping
tick). Every phase is bounded by --timeout seconds; a request that fails ends
the benchmark with its error.
"""

import argparse
import concurrent.futures
import datetime
import http.client
import json
import os
import platform
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _served(workdir: str, slots: int, timeout: float):
  """`python -m ctm_jax.serve` in a subprocess (`serve.Child`), up once `/healthz` answers."""
  from ctm_jax import serve  # pylint: disable=g-import-not-at-top
  try:
    return serve.Child(workdir, f'--slots={slots}', f'--max_pending={1 << 16}', timeout=timeout, cwd=REPO)
  except serve.ChildFailed as e:
    raise SystemExit(str(e)) from None


def _clients(ask, bodies, clients: int, timeout: float):
  """(wall s, latencies s, answers) of `ask` on every body from `clients`
  threads, each asking once its last answer is back."""
  deadline = time.perf_counter() + timeout

  def timed(body):
    started = time.perf_counter()
    if started > deadline:
      raise SystemExit(f'the load ran past --timeout={timeout:.0f} s')
    got = ask(body)
    return time.perf_counter() - started, got

  started = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(timed, bodies))
  wall = time.perf_counter() - started
  return wall, np.array([r[0] for r in results]), [r[1] for r in results]


def _load(port: int, bodies, clients: int, timeout: float):
  """`_clients` over HTTP: one keep-alive connection per client thread. The
  standard library's client, the lightest at hand: on a small machine the
  clients share the CPU with the server."""
  local = threading.local()

  def ask(body):
    if not hasattr(local, 'connection'):
      local.connection = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    local.connection.request('POST', '/v1/predict', json.dumps(body), {'Content-Type': 'application/json'})
    reply = local.connection.getresponse()
    text = reply.read()
    if reply.status != 200:
      raise SystemExit(f'a request failed: HTTP {reply.status} {text[:300]!r}')
    return json.loads(text)

  return _clients(ask, bodies, clients, timeout)


def _engine_load(engine, inputs, threshold: float, clients: int, timeout: float):
  """`_clients` on the engine in this process, no HTTP: the continuous batch alone."""
  return _clients(
      lambda x: engine.submit(x, threshold, engine.max_ticks).result(timeout), inputs, clients, timeout
  )


def _accuracy(task, config, answers, batch) -> float | None:
  if 'targets' not in batch:
    return None
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from ctm_jax.models import ctm as ctm_lib  # pylint: disable=g-import-not-at-top

  predictions = np.asarray([a['prediction'] for a in answers], np.float32)
  certainties = np.asarray([[1 - a['certainty'], a['certainty']] for a in answers], np.float32)
  ticks = np.asarray([a['ticks_used'] for a in answers], np.int32)
  output = ctm_lib.EarlyExit(
      jnp.asarray(predictions), jnp.asarray(certainties), jnp.asarray(ticks), jnp.asarray(ticks > 0)
  ).as_output()
  return float(np.mean(np.asarray(task.correct(output, batch))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a training run, an artefact or an import')
  parser.add_argument('--clients', type=int, default=128)
  parser.add_argument('--requests', type=int, default=512)
  parser.add_argument('--slots', type=int, default=64)
  parser.add_argument('--threshold', type=float, default=0.9)
  parser.add_argument('--timeout', type=float, default=600.0, help='seconds each phase may take')
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)
  if args.clients < 1 or args.requests < 1 or args.slots < 1:
    parser.error('--clients, --requests and --slots must be positive')

  import jax  # pylint: disable=g-import-not-at-top

  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from ctm_jax import inference  # pylint: disable=g-import-not-at-top
  from ctm_jax import serve  # pylint: disable=g-import-not-at-top
  from ctm_jax import tasks  # pylint: disable=g-import-not-at-top

  _, _, config = inference.from_pretrained(args.workdir)
  task = tasks.get(config.task)
  examples = serve.held_out_examples(task, config, args.requests, 0)
  batch = {}
  labels = [e.get('label') for e in examples]
  if all(label is not None for label in labels):
    batch['targets'] = np.asarray(labels, np.int32)  # a class, or a row (parity's bits, a maze's route)

  rows = []

  def row(phase, slots, clients, threshold, wall, latencies, answers):
    rows.append(dict(
        phase=phase, slots=slots, clients=clients, threshold=threshold, requests=len(answers),
        requests_per_s=len(answers) / wall, p50_ms=1000 * float(np.percentile(latencies, 50)),
        p99_ms=1000 * float(np.percentile(latencies, 99)),
        mean_ticks=float(np.mean([a['ticks_used'] for a in answers])),
        accuracy=_accuracy(task, config, answers, batch) if batch else None,
    ))

  phases = [
      ('early exit', args.slots, args.clients, args.threshold),
      ('every tick', args.slots, args.clients, 2.0),
      ('one at a time', 1, 1, args.threshold),
  ]
  servers = {}
  try:
    for name, slots, clients, threshold in phases:
      if slots not in servers:
        servers[slots] = _served(args.workdir, slots, args.timeout)
      port = servers[slots].port
      bodies = [{'input': e['input'], 'threshold': threshold} for e in examples]
      _load(port, bodies[: min(len(bodies), 2 * clients)], clients, args.timeout)  # warm: connections, compiles
      row(name, slots, clients, threshold, *_load(port, bodies, clients, args.timeout))
  finally:
    for server in servers.values():
      server.stop()

  # The same load on the engine in this process: what the continuous batch
  # serves without HTTP, JSON and reading inputs (read here beforehand).
  model, variables, _, _ = serve.load(args.workdir, None)
  classes = serve.output_classes(model)
  inputs = [serve.read_payload(task, config, e['input'])['inputs'][0] for e in examples]
  engine = serve.Engine(model, variables, slots=args.slots, max_pending=1 << 16)
  try:
    engine.warm_up(inputs[0])
    for name, threshold in (('engine: early exit', args.threshold), ('engine: every tick', 2.0)):
      _engine_load(engine, inputs[: 2 * args.clients], threshold, args.clients, args.timeout)
      wall, latencies, histories = _engine_load(engine, inputs, threshold, args.clients, args.timeout)
      answers = [serve.answer(task, config, h, False, classes) for h in histories]
      row(name, args.slots, args.clients, threshold, wall, latencies, answers)
  finally:
    engine.stop()

  print(f'# serve_bench | {args.workdir} ({config.task}) | {args.requests} held-out requests | '
        f'{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].platform} | '
        f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} | git {harness.git_commit()}')
  print('| phase | slots | clients | threshold | requests/s | p50 ms | p99 ms | mean ticks | accuracy |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    accuracy = '-' if r['accuracy'] is None else f'{100 * r["accuracy"]:.2f}%'
    print(f'| {r["phase"]} | {r["slots"]} | {r["clients"]} | {r["threshold"]:g} | {r["requests_per_s"]:.1f} | '
          f'{r["p50_ms"]:.1f} | {r["p99_ms"]:.1f} | {r["mean_ticks"]:.2f} | {accuracy} |')
  speed = {r['phase']: r['requests_per_s'] for r in rows}
  print(f'early exit served {speed["early exit"] / speed["every tick"]:.2f}x the requests/s of every tick over '
        f'HTTP, {speed["engine: early exit"] / speed["engine: every tick"]:.2f}x in the engine alone')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'workdir': args.workdir, 'task': config.task, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  main()
