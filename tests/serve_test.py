"""The HTTP server (`python -m ctm_jax.serve`): served answers equal the
model's own at the reported tick under concurrent clients with mixed
thresholds, every request is answered once, bad requests get one line and a
4xx while the server stays up, and SIGTERM drains what is in flight."""

import base64
import concurrent.futures
import importlib.util
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

pytest.importorskip('starlette', reason='the serve extra is not installed: pip install -e ".[serve]"')
httpx = pytest.importorskip('httpx', reason='the serve extra is not installed: pip install -e ".[serve]"')
uvicorn = pytest.importorskip('uvicorn', reason='the serve extra is not installed: pip install -e ".[serve]"')

from ctm_jax import serve  # pylint: disable=g-import-not-at-top
from ctm_jax import tasks  # pylint: disable=g-import-not-at-top
from ctm_jax.configs import parity as parity_configs  # pylint: disable=g-import-not-at-top
from early_exit_test import _full_run  # pylint: disable=g-import-not-at-top
from early_exit_test import _model  # pylint: disable=g-import-not-at-top
from serving_test import _thresholds_between  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def served():
  config = parity_configs.get_config('smoke')
  task = tasks.get(config.task)
  model, variables, _ = _model(config, 10.0, 10.0)
  app = serve.make_app(model, variables, config, task, slots=4, threshold=0.9, max_ticks=2 * model.iterations,
                       max_wait_ms=2.0, max_pending=64)
  port = serve.free_port()
  server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 120
  while time.time() < deadline:
    try:
      if httpx.get(url + '/healthz', timeout=1).status_code == 200:
        break
    except httpx.HTTPError:
      time.sleep(0.2)
  else:
    raise AssertionError('the server did not come up')
  yield dict(url=url, model=model, variables=variables, config=config, task=task)
  server.should_exit = True
  thread.join(30)


def _bits(inputs_L) -> str:
  return ''.join('1' if v < 0 else '0' for v in inputs_L)  # parity reads a 1 as -1


def test_concurrent_requests_with_mixed_thresholds_equal_the_models_own_ticks(served):
  model, variables, config, task = served['model'], served['variables'], served['config'], served['task']
  queue = 24
  inputs = np.asarray(task.model_inputs(task.synthetic_batch(config, queue, seed=6)))
  texts = [_bits(row) for row in inputs]
  np.testing.assert_array_equal(task.read_input(config, texts[0])['inputs'][0], inputs[0])
  max_ticks = 2 * model.iterations
  predictions_QxOxT, certainties_Qx2xT = _full_run(model, variables, inputs, max_ticks)
  certainty_QxT = certainties_Qx2xT[:, 1]
  rng = np.random.default_rng(3)
  choices = [*_thresholds_between(certainty_QxT, rng, 3), 1.5]
  thresholds = [float(rng.choice(choices)) for _ in range(queue)]
  limits = [int(t) for t in rng.integers(1, max_ticks + 1, queue)]

  def ask(q):
    body = {'input': texts[q], 'threshold': thresholds[q], 'max_ticks': limits[q], 'trace': q % 2 == 0}
    return httpx.post(served['url'] + '/v1/predict', json=body, timeout=120)

  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    replies = list(pool.map(ask, range(queue)))
  for q, reply in enumerate(replies):
    assert reply.status_code == 200, reply.text
    got = reply.json()
    sure_T = certainty_QxT[q, : limits[q]] >= thresholds[q]
    ticks = int(np.argmax(sure_T)) + 1 if sure_T.any() else limits[q]
    assert got['ticks_used'] == ticks
    assert got['exit'] == ('threshold' if sure_T.any() else 'max_ticks')
    np.testing.assert_allclose(got['prediction'], predictions_QxOxT[q, :, ticks - 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got['certainty'], certainty_QxT[q, ticks - 1], rtol=1e-5, atol=1e-5)
    assert [t['answer'] for t in got['ticks']] == [
        task.describe(config, predictions_QxOxT[q, :, t]) for t in range(ticks)
    ]
    assert got['answer'] == got['ticks'][-1]['answer']
    assert ('attention' in got) == (q % 2 == 0)
    if 'attention' in got:
      assert np.asarray(got['attention']).shape == (ticks, model.heads, inputs.shape[1])
      probabilities = np.asarray(got['probabilities'])
      assert probabilities.shape == (ticks, inputs.shape[1], 2)  # parity: a bit per position
      np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-4)
      np.testing.assert_allclose(got['input'], inputs[q])
  assert len({r.json()['ticks_used'] for r in replies}) > 3
  metrics = httpx.get(served['url'] + '/metrics').text
  assert 'ctm_requests_total{status="200"}' in metrics
  assert 'ctm_request_seconds_bucket{le="+Inf"}' in metrics and 'ctm_slots 4' in metrics
  assert 'ctm_in_flight 0\n' in metrics  # every request answered has left the gauge


def _npy_b64(array) -> str:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    'body, status, named',
    [
        (b'{not json', 400, 'body: not JSON'),
        (b'[1, 2]', 400, 'body: a JSON list'),
        (json.dumps({'inputs': '0101'}).encode(), 400, 'inputs: not a field'),
        (json.dumps({'threshold': 0.5}).encode(), 400, 'input: missing'),
        (json.dumps({'input': '01', 'threshold': 'high'}).encode(), 400, "threshold: 'high'"),
        (json.dumps({'input': '01', 'threshold': -1}).encode(), 400, 'threshold: -1'),
        (json.dumps({'input': '01', 'max_ticks': 0}).encode(), 400, 'max_ticks: 0'),
        (json.dumps({'input': '01', 'max_ticks': 10_000}).encode(), 400, 'max_ticks: 10000'),
        (json.dumps({'input': '01', 'trace': 'yes'}).encode(), 400, "trace: 'yes'"),
        (json.dumps({'input': '01'}).encode(), 400, 'input: (2,) values; the model reads 8'),
        (json.dumps({'input': 'hello'}).encode(), 400, 'input:'),
        (json.dumps({'input': 7}).encode(), 400, 'input: send text'),
        (json.dumps({'input': {'npy_base64': '@@@'}}).encode(), 400, 'input.npy_base64: not base64'),
        (json.dumps({'input': {'npy_base64': base64.b64encode(b'junk').decode()}}).encode(), 400, 'input.npy_base64:'),
        (json.dumps({'input': {'npy_base64': _npy_b64(np.full(8, np.nan, np.float32))}}).encode(), 400, 'NaN'),
        (json.dumps({'input': '/etc/passwd'}).encode(), 400, 'input:'),
        (b'x' * (serve.MAX_BODY_BYTES + 1), 413, 'body:'),
    ],
)
def test_a_bad_request_is_one_line_naming_the_field_and_the_server_stays_up(served, body, status, named):
  reply = httpx.post(served['url'] + '/v1/predict', content=body, timeout=60)
  assert reply.status_code == status, reply.text
  message = reply.json()['error']
  assert named in message and '\n' not in message and 'Traceback' not in message
  assert '/tmp' not in message and 'ctm_serve_' not in message  # no private path leaks
  assert httpx.get(served['url'] + '/healthz').status_code == 200


def test_model_describes_what_is_served(served):
  got = httpx.get(served['url'] + '/v1/model').json()
  assert got['task'] == 'parity' and got['slots'] == 4 and got['max_ticks'] == 2 * served['model'].iterations
  assert got['parameters'] == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(served['variables']['params']))


@pytest.fixture(scope='module')
def parity_run(tmp_path_factory):
  from ctm_jax import train  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp('serve') / 'run'
  config = parity_configs.get_config('smoke')
  config.training_iterations, config.save_every, config.track_every = 10, 10, 10
  train.train_and_evaluate(config, str(workdir))
  return workdir


def _metrics(url) -> dict:
  lines = httpx.get(url + '/metrics').text.splitlines()
  return {k: float(v) for k, v in (line.rsplit(' ', 1) for line in lines if line and not line.startswith('#'))}


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(parity_run):
  # One slot and 30000 ticks each (seconds): the requests are still running when SIGTERM comes.
  server = serve.Child(parity_run, '--slots=1', '--max_ticks=30000', cwd=REPO)
  process, url = server.process, server.url
  try:
    body = {'input': '01101001', 'threshold': 2.0}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      replies = [pool.submit(httpx.post, url + '/v1/predict', json=body, timeout=120) for _ in range(4)]
      # SIGTERM once all four are in (answered, or received and not yet answered) and some still run.
      deadline = time.time() + 120
      while True:
        numbers = _metrics(url)
        done = numbers.get('ctm_requests_total{status="200"}', 0)
        if numbers['ctm_in_flight'] + done == 4 and done < 4:
          break
        assert time.time() < deadline, numbers
        time.sleep(0.05)
      process.send_signal(signal.SIGTERM)
      answered = [r.result() for r in replies]
    assert [r.status_code for r in answered] == [200] * 4, [r.text for r in answered]
    assert all(r.json()['ticks_used'] == 30000 for r in answered)
    assert process.wait(timeout=60) == 0, server.log()
  finally:
    if process.poll() is None:
      process.kill()


@pytest.mark.slow
@pytest.mark.parametrize(
    'flags, named',
    [(('--slots=0',), '--slots=0'), (('--max_ticks=0',), '--max_ticks=0'), (('--threshold=0',), '--threshold=0')],
)
def test_bad_flags_are_one_line(parity_run, flags, named):
  done = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.serve', f'--workdir={parity_run}', *flags],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )
  assert done.returncode == 2
  assert named in done.stderr and 'Traceback' not in done.stderr


@pytest.mark.slow
def test_a_missing_workdir_is_one_line(tmp_path):
  done = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.serve', f'--workdir={tmp_path / "nothing"}'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )
  assert done.returncode == 2 and 'nothing' in done.stderr and 'Traceback' not in done.stderr


def test_the_page_and_its_assets_are_served(served):
  page = httpx.get(served['url'] + '/')
  assert page.status_code == 200 and '<canvas id="input_view"' in page.text
  for asset in ('/page/page.js', '/page/page.css'):
    assert httpx.get(served['url'] + asset).status_code == 200
  assert httpx.get(served['url'] + '/page/../serve.py').status_code == 404


def test_generated_examples_are_requests_the_server_answers(served):
  got = httpx.get(served['url'] + '/v1/examples', params={'count': 3, 'seed': 5}).json()['examples']
  assert len(got) == 3 and all('npy_base64' in e['input'] for e in got)
  source = served['task'].eval_source(served['config'])  # held-out records 5, 6, 7
  assert [e['label'] for e in got] == [np.asarray(source[i]['targets']).tolist() for i in (5, 6, 7)]  # per bit
  reply = httpx.post(served['url'] + '/v1/predict', json={'input': got[0]['input']}, timeout=60)
  assert reply.status_code == 200, reply.text
  bad = httpx.get(served['url'] + '/v1/examples', params={'count': 99})
  assert bad.status_code == 400 and 'count:' in bad.json()['error']


def test_the_page_in_a_browser_thinks_on_an_example_and_shows_an_api_error(served, tmp_path):
  from ctm_jax.tools import page_screenshot  # pylint: disable=g-import-not-at-top

  chromium = page_screenshot.chromium_path()
  if chromium is None or importlib.util.find_spec('playwright') is None:
    why = 'no chromium on PATH or playwright not importable (.ci/run installs both for this test)'
    if os.environ.get('CTM_BROWSER_REQUIRED'):
      pytest.fail(why)
    pytest.skip(why)
  from playwright import sync_api  # pylint: disable=g-import-not-at-top
  shots = pathlib.Path(os.environ.get('CTM_TEST_ARTEFACTS') or tmp_path)
  shots.mkdir(parents=True, exist_ok=True)
  with sync_api.sync_playwright() as playwright:
    browser = page_screenshot.launch(playwright, chromium)
    try:
      page = browser.new_page(viewport={'width': 1200, 'height': 900})
      ticks = page_screenshot.think(page, served['url'], example=3, tick=1)
      assert page.text_content('#model').startswith('parity')
      assert page.text_content('#answer').startswith('parity ')
      assert ticks >= 1 and page.is_visible('#stop_mark')
      assert page.text_content('#tick_label') == f'1 of {ticks}'
      assert page.text_content('#tick_answer').startswith('tick 1: parity ')
      # ?seed=3 picks the held-out example of seed 3: the page answers as the API does.
      chosen = httpx.get(served['url'] + '/v1/examples?seed=3').json()['examples'][0]['input']
      direct = httpx.post(served['url'] + '/v1/predict', json={'input': chosen}, timeout=60).json()
      assert page.text_content('#answer') == direct['answer'] and ticks == direct['ticks_used']
      page.screenshot(path=str(shots / 'page_parity.png'), full_page=True)
      page.fill('#text', 'hello')  # typed text replaces the example; parity reads no such thing
      page.click('#submit')
      page.wait_for_selector('#error:not([hidden])')
      assert page.text_content('#error').startswith('input:')
      page.screenshot(path=str(shots / 'page_error.png'), full_page=True)
    finally:
      browser.close()


@pytest.mark.parametrize('config_name', ['qamnist', 'lstm'])
def test_what_the_server_cannot_tick_is_refused_at_start_in_one_line(tmp_path, config_name):
  from ctm_jax import train  # pylint: disable=g-import-not-at-top
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import qamnist as qamnist_configs  # pylint: disable=g-import-not-at-top

  config = qamnist_configs.get_config('smoke') if config_name == 'qamnist' else parity_configs.get_config('lstm_smoke')
  config.training_iterations, config.save_every, config.track_every, config.warmup_steps = 2, 2, 2, 1
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  with pytest.raises(validation.UsageError, match='the server cannot tick'):
    serve.load(str(tmp_path / 'run'), None)


def test_a_mazes_trace_path_walks_the_true_route_to_the_goal_and_stops_at_a_wall():
  from ctm_jax.configs import mazes as maze_configs  # pylint: disable=g-import-not-at-top
  from ctm_jax.data import mazes as maze_data  # pylint: disable=g-import-not-at-top

  config = maze_configs.get_config('smoke')
  task = tasks.get(config.task)
  record = maze_data.GeneratedMazes(21, 400, seed=0, num_records=5)[1]
  route_R = np.asarray(record['route'])
  inputs = maze_data.model_input(record['image'], maze_data.expand_range_of(config))
  image = (inputs + 1) / 2 if maze_data.expand_range_of(config) else inputs
  goal = [int(v) for v in np.argwhere(np.all(image == np.array(maze_data.GOAL), axis=-1))[0]]
  right = np.eye(5, dtype=np.float32)[route_R].reshape(-1)
  walked = task.trace_path(config, inputs, right)
  assert walked['blocked'] is None and goal in walked['cells']
  assert len(walked['cells']) == 1 + np.sum(route_R < 4)  # a cell per move, waits stay
  start = walked['cells'][0]
  assert np.all(image[start[0], start[1]] == maze_data.START)
  into_wall = next(m for m, (dy, dx) in enumerate(maze_data.MOVE_DELTAS)
                   if np.all(image[start[0] + dy, start[1] + dx] == maze_data.WALL))
  wrong = np.eye(5, dtype=np.float32)[np.full_like(route_R, into_wall)].reshape(-1)
  stopped = task.trace_path(config, inputs, wrong)
  assert stopped['cells'] == [start] and stopped['blocked'] is not None
  assert tasks.get('parity').trace_path(parity_configs.get_config('smoke'), np.ones(8), np.zeros(16)) is None


@pytest.mark.slow
def test_serve_bench_measures_every_phase_on_a_run(parity_run, tmp_path, capsys):
  from benchmarks import serve_bench  # pylint: disable=g-import-not-at-top

  serve_bench.main([f'--workdir={parity_run}', '--requests=24', '--clients=4', '--slots=4', '--timeout=300',
                    f'--json={tmp_path / "bench.json"}'])
  rows = {r['phase']: r for r in json.loads((tmp_path / 'bench.json').read_text())['rows']}
  assert set(rows) == {'early exit', 'every tick', 'one at a time', 'engine: early exit', 'engine: every tick'}
  ticks = parity_configs.get_config('smoke').model.iterations
  for name, row in rows.items():
    assert row['requests'] == 24 and row['requests_per_s'] > 0 and 0 < row['p50_ms'] <= row['p99_ms'], name
    assert 0 <= row['accuracy'] <= 1, name
  # Every tick runs every tick; early exit never more; HTTP and the engine alone answer alike.
  assert rows['every tick']['mean_ticks'] == rows['engine: every tick']['mean_ticks'] == ticks
  assert rows['early exit']['mean_ticks'] == rows['engine: early exit']['mean_ticks'] <= ticks
  assert rows['early exit']['accuracy'] == rows['engine: early exit']['accuracy']
  assert 'x the requests/s of every tick' in capsys.readouterr().out


@pytest.mark.slow
def test_page_screenshot_writes_the_page_thinking_and_replaces_nothing(parity_run, tmp_path):
  from ctm_jax.tools import page_screenshot  # pylint: disable=g-import-not-at-top

  if page_screenshot.chromium_path() is None or importlib.util.find_spec('playwright') is None:
    why = 'no chromium on PATH or playwright not importable (.ci/run installs both for this test)'
    if os.environ.get('CTM_BROWSER_REQUIRED'):
      pytest.fail(why)
    pytest.skip(why)
  out = tmp_path / 'page.png'
  command = [sys.executable, '-m', 'ctm_jax.tools.page_screenshot', f'--workdir={parity_run}', f'--out={out}',
             '--example=2']
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 2 and 'pass --overwrite' in again.stderr.strip().splitlines()[-1]
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_fresh_mazes_are_new_reproducible_and_solvable_and_other_tasks_say_they_make_none(served):
  from ctm_jax.configs import mazes as maze_configs  # pylint: disable=g-import-not-at-top

  config = maze_configs.get_config('smoke')
  task = tasks.get(config.task)
  fresh = serve.held_out_examples(task, config, 2, 7, fresh=True)
  assert fresh == serve.held_out_examples(task, config, 2, 7, fresh=True)  # seeded
  assert fresh[0] != fresh[1]
  held_out = serve.held_out_examples(task, config, 50, 0)
  assert not any(f['input'] == h['input'] for f in fresh for h in held_out)
  for example in fresh:
    inputs = serve.read_payload(task, config, example['input'])['inputs'][0]
    assert inputs.shape == tuple(config.image_shape)
    # Its label is its route: walked from the start it ends on the goal.
    right = np.eye(5, dtype=np.float32)[np.asarray(example['label'])].reshape(-1)
    walked = task.trace_path(config, inputs, right)
    assert walked['blocked'] is None and len(walked['cells']) > 1
  with pytest.raises(serve.BadRequest, match='generates no examples'):
    serve.held_out_examples(served['task'], served['config'], 1, 0, fresh=True)
  assert httpx.get(served['url'] + '/v1/model').json()['generates'] is False
  refused = httpx.get(served['url'] + '/v1/examples', params={'generate': 1})
  assert refused.status_code == 404 and refused.json()['error'].startswith('generate:')
