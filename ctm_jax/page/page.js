// The page: ask the server (/v1/predict with trace) and draw each tick.
'use strict';

const $ = (id) => document.getElementById(id);
let model = null;      // GET /v1/model
let payload = null;    // what the next request sends as `input`
let result = null;     // the last answer
let drawn = false;     // the pad has strokes

function showError(message) {
  const box = $('error');
  box.textContent = message;
  box.hidden = !message;
}

async function getJSON(url, options) {
  const reply = await fetch(url, options);
  let body = null;
  try { body = await reply.json(); } catch (e) { body = null; }
  if (!reply.ok) throw new Error((body && body.error) || `${url}: HTTP ${reply.status}`);
  return body;
}

function colour(value) {  // 0..1 -> dark blue .. yellow
  const v = Math.max(0, Math.min(1, value));
  return `rgb(${Math.round(255 * Math.min(1, 2 * v))},${Math.round(200 * v)},${Math.round(120 * (1 - v))})`;
}

// --- the input ---------------------------------------------------------------
function setupPad() {
  const pad = $('pad');
  const ctx = pad.getContext('2d');
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, pad.width, pad.height);
  let down = false;
  const at = (e) => { const r = pad.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  pad.addEventListener('pointerdown', (e) => { down = true; ctx.beginPath(); ctx.moveTo(...at(e)); });
  pad.addEventListener('pointermove', (e) => {
    if (!down) return;
    ctx.lineTo(...at(e)); ctx.strokeStyle = '#fff'; ctx.lineWidth = 22; ctx.lineCap = 'round'; ctx.stroke();
    drawn = true; payload = null;
  });
  window.addEventListener('pointerup', () => { down = false; });
  $('clear').addEventListener('click', () => { ctx.fillStyle = '#000'; ctx.fillRect(0, 0, pad.width, pad.height); drawn = false; });
}

function padPNG() {
  const pad = $('pad');
  const [h, w] = model.input_shape;
  const small = document.createElement('canvas');
  small.width = w; small.height = h;
  small.getContext('2d').drawImage(pad, 0, 0, w, h);
  return small.toDataURL('image/png').split(',')[1];
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(',')[1]);
    reader.onerror = () => reject(new Error(`${file.name}: cannot read it`));
    reader.readAsDataURL(file);
  });
}

// --- drawing a tick ----------------------------------------------------------
function normalised(values, flat = 0.5) {  // min..max -> 0..1; all equal -> `flat`
  let lo = Infinity; let hi = -Infinity;
  for (const v of values) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return values.map((v) => (hi > lo ? (v - lo) / (hi - lo) : flat));
}

function attentionAt(tick) {
  if (!result.attention) return null;
  const heads = result.attention[tick];
  const h = $('head').value;
  if (h !== 'mean' && h !== '') return heads[Number(h)];
  return heads[0].map((_, n) => heads.reduce((s, head) => s + head[n], 0) / heads.length);
}

function drawInput(tick) {
  const canvas = $('input_view');
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const input = result.input;
  const attention = attentionAt(tick);
  if (!input) return;
  const image = Array.isArray(input[0]) && Array.isArray(input[0][0]);
  if (image) {  // H x W x C
    if (canvas.height !== canvas.width) { canvas.height = canvas.width; }
    const h = input.length; const w = input[0].length; const c = input[0][0].length;
    const flat = normalised(input.flat(2));
    const cell = Math.min(canvas.width / w, canvas.height / h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const i = (y * w + x) * c;
        const rgb = c >= 3 ? [flat[i], flat[i + 1], flat[i + 2]] : [flat[i], flat[i], flat[i]];
        ctx.fillStyle = `rgb(${rgb.map((v) => Math.round(255 * v)).join(',')})`;
        ctx.fillRect(x * cell, y * cell, Math.ceil(cell), Math.ceil(cell));
      }
    }
    if (attention && model.attention_grid) {
      const [gh, gw] = model.attention_grid;
      const weight = normalised(attention, 0);  // the spread, not the level: uniform attention shows nothing
      const ch = (h * cell) / gh; const cw = (w * cell) / gw;
      for (let y = 0; y < gh; y++) {
        for (let x = 0; x < gw; x++) {
          ctx.fillStyle = `rgba(255,60,0,${0.7 * weight[y * gw + x]})`;
          ctx.fillRect(x * cw, y * ch, Math.ceil(cw), Math.ceil(ch));
        }
      }
    }
    const path = result.paths && result.paths[tick];
    if (path) {  // the route this tick's answer walks (a maze), as the reference's gifs draw it
      const centre = ([y, x]) => [(x + 0.5) * cell, (y + 0.5) * cell];
      ctx.strokeStyle = '#00c8ff'; ctx.lineWidth = Math.max(2, cell / 3); ctx.lineJoin = 'round';
      ctx.beginPath();
      path.cells.forEach((c, i) => { const [px, py] = centre(c); if (i) ctx.lineTo(px, py); else ctx.moveTo(px, py); });
      ctx.stroke();
      if (path.blocked) {
        const [px, py] = centre(path.blocked); const r = cell / 2;
        ctx.strokeStyle = '#ff2020'; ctx.beginPath();
        ctx.moveTo(px - r, py - r); ctx.lineTo(px + r, py + r); ctx.moveTo(px + r, py - r); ctx.lineTo(px - r, py + r);
        ctx.stroke();
      }
    }
    return;
  }
  // A sequence: one cell per position, in a square when it is one (as the paper draws parity).
  const n = input.length;
  const side = Math.round(Math.sqrt(n));
  const cols = side * side === n && n > 8 ? side : Math.min(n, 16);
  const rows = Math.ceil(n / cols);
  const cell = Math.min(canvas.width / cols, 60);
  if (canvas.height !== Math.ceil(rows * cell)) { canvas.height = Math.ceil(rows * cell); }  // no empty square below a row
  const peak = attention ? Math.max(...attention) : 1;
  ctx.font = `${Math.round(cell * 0.4)}px monospace`;
  ctx.textAlign = 'center'; ctx.textBaseline = 'middle';
  for (let i = 0; i < n; i++) {
    const x = (i % cols) * cell; const y = Math.floor(i / cols) * cell;
    ctx.fillStyle = attention ? colour(attention[i] / (peak || 1)) : '#eee';
    ctx.fillRect(x + 1, y + 1, cell - 2, cell - 2);
    const value = Array.isArray(input[i]) ? input[i].indexOf(Math.max(...input[i])) : input[i];
    ctx.fillStyle = '#fff';
    ctx.fillText(String(Math.round(value * 100) / 100), x + cell / 2, y + cell / 2);
  }
}

function drawCertainty(tick) {
  const svg = $('certainty');
  const ticks = result.ticks.map((t) => t.certainty);
  const w = 340; const h = 200; const left = 30; const right = 12; const top = 20; const bottom = 30;
  const x = (t) => left + ((w - left - right) * t) / Math.max(1, ticks.length - 1);
  const y = (c) => h - bottom - (h - top - bottom) * c;
  const points = ticks.map((c, t) => `${x(t)},${y(c)}`).join(' ');
  const threshold = Number($('threshold').value);
  const stop = result.ticks_used - 1;
  svg.innerHTML = `
    <line x1="${left}" y1="${y(0)}" x2="${w - right}" y2="${y(0)}" stroke="#bbb"/>
    <line x1="${left}" y1="${y(1)}" x2="${w - right}" y2="${y(1)}" stroke="#eee"/>
    <text x="${left - 6}" y="${y(0) + 4}" font-size="11" text-anchor="end">0</text>
    <text x="${left - 6}" y="${y(1) + 4}" font-size="11" text-anchor="end">1</text>
    ${threshold <= 1 ? `<line x1="${left}" y1="${y(threshold)}" x2="${w - right}" y2="${y(threshold)}" stroke="#e08" stroke-dasharray="4 3"/>
    <text x="${left + 4}" y="${y(threshold) - 4}" font-size="11" fill="#e08">threshold ${threshold}</text>` : ''}
    <polyline points="${points}" fill="none" stroke="#0366d6" stroke-width="2"/>
    <circle id="stop_mark" cx="${x(stop)}" cy="${y(ticks[stop])}" r="7" fill="none" stroke="#e08" stroke-width="2"/>
    <circle cx="${x(tick)}" cy="${y(ticks[tick])}" r="4" fill="#0366d6"/>
    <text x="${x(0)}" y="${h - bottom + 14}" font-size="11" text-anchor="middle">1</text>
    <text x="${x(ticks.length - 1)}" y="${h - bottom + 14}" font-size="11" text-anchor="middle">${ticks.length}</text>
    <text x="${(left + w - right) / 2}" y="${h - 4}" font-size="11" text-anchor="middle">tick</text>`;
}

function drawProbabilities(tick) {
  const canvas = $('probabilities');
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const rows = result.probabilities[tick];
  if (rows.length === 1) {  // one answer: bars of the most probable classes
    if (canvas.height !== 200) { canvas.height = 200; }
    const top = rows[0].map((p, c) => [p, c]).sort((a, b) => b[0] - a[0]).slice(0, 10);
    const bar = canvas.height / top.length;
    ctx.font = '12px sans-serif'; ctx.textBaseline = 'middle';
    top.forEach(([p, c], i) => {
      ctx.fillStyle = i === 0 ? '#0366d6' : '#9ab';
      ctx.fillRect(60, i * bar + 2, (canvas.width - 120) * p, bar - 4);
      ctx.fillStyle = '#222';
      ctx.fillText(`class ${c}`, 2, i * bar + bar / 2);
      ctx.fillText(`${(100 * p).toFixed(1)}%`, canvas.width - 55, i * bar + bar / 2);
    });
  } else {  // an answer per position: a heat map, positions across, classes down
    const classes = rows[0].length;
    const left = 52; const bottom = 18;
    const cw = (canvas.width - left) / rows.length; const ch = Math.min(40, (200 - bottom) / classes);
    if (canvas.height !== Math.ceil(classes * ch + bottom)) { canvas.height = Math.ceil(classes * ch + bottom); }
    ctx.font = '11px sans-serif'; ctx.textBaseline = 'middle'; ctx.fillStyle = '#222';
    for (let c = 0; c < classes; c++) ctx.fillText(`class ${c}`, 2, c * ch + ch / 2);
    rows.forEach((row, i) => row.forEach((p, c) => {
      ctx.fillStyle = colour(p);
      ctx.fillRect(left + i * cw, c * ch, Math.ceil(cw), Math.ceil(ch));
    }));
    ctx.fillStyle = '#222'; ctx.textAlign = 'center';
    const every = Math.ceil(rows.length / 12);  // position numbers, at most a dozen
    for (let i = 0; i < rows.length; i += every) ctx.fillText(String(i + 1), left + (i + 0.5) * cw, classes * ch + bottom / 2);
    ctx.textAlign = 'start';
  }
  $('tick_answer').textContent = `tick ${tick + 1}: ${result.ticks[tick].answer} (certainty ${result.ticks[tick].certainty.toFixed(3)})`;
}

function render() {
  const tick = Number($('tick').value) - 1;
  $('tick_label').textContent = `${tick + 1} of ${result.ticks.length}`;
  drawInput(tick);
  drawCertainty(tick);
  drawProbabilities(tick);
}

// --- asking ------------------------------------------------------------------
async function think() {
  showError('');
  let input = payload;
  const text = $('text').value.trim();
  if (!input && text) input = text;
  if (!input && drawn && model.input_shape) input = { png_base64: padPNG() };
  if (!input) { showError('input: pick a held-out example, upload a file, type the input or draw it'); return; }
  const body = { input, threshold: Number($('threshold').value), trace: true };
  if ($('max_ticks').value) body.max_ticks = Number($('max_ticks').value);
  $('submit').disabled = true;
  try {
    result = await getJSON('/v1/predict', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  } catch (e) {
    showError(e.message);
    return;
  } finally {
    $('submit').disabled = false;
  }
  $('result').hidden = false;
  $('answer').textContent = result.answer;
  $('summary').textContent = `${result.ticks_used} ticks of ${model.max_ticks}, certainty ${result.certainty.toFixed(3)}, stopped by ${result.exit === 'threshold' ? 'the threshold' : 'the tick limit'}`;
  const slider = $('tick');
  slider.max = result.ticks.length;
  slider.value = result.ticks_used;
  const heads = result.attention ? result.attention[0].length : 0;
  $('head').innerHTML = '<option value="mean">mean of heads</option>' +
    Array.from({ length: heads }, (_, k) => `<option value="${k}">head ${k + 1}</option>`).join('');
  render();
}

// ?seed=N in the page's address makes the examples N, N+1, ... (a page to show
// or test again); otherwise each is random.
const firstSeed = new URLSearchParams(location.search).get('seed');
let picked = 0;

async function example(generate = false) {
  showError('');
  const seed = firstSeed !== null && /^\d+$/.test(firstSeed) ? Number(firstSeed) + picked++ : Math.floor(Math.random() * 1e9);
  try {
    const got = await getJSON(`/v1/examples?count=1&seed=${seed}${generate ? '&generate=1' : ''}`);
    const pick = got.examples[0];
    payload = pick.input;
    const what = generate ? `a new ${model.task} example, made now` : `a held-out ${model.task} example`;
    $('text').value = typeof pick.input === 'string' ? pick.input : `(${what}${typeof pick.label === 'number' ? `, answer ${pick.label}` : ''})`;
  } catch (e) {
    showError(e.message);
  }
}

async function start() {
  try {
    model = await getJSON('/v1/model');
  } catch (e) {
    showError(e.message);
    return;
  }
  $('model').textContent = `${model.task}: ${model.model}, ${model.parameters.toLocaleString()} parameters, ${model.ticks_trained} ticks trained, up to ${model.max_ticks} served, ${model.slots} slots`;
  $('max_ticks').max = model.max_ticks;
  $('max_ticks').placeholder = String(model.max_ticks);
  $('threshold').value = model.threshold;
  // A one-channel picture (a digit) can be drawn; colour pictures and mazes come as examples or files.
  if (model.input_shape && model.input_shape.length === 3 && model.input_shape[2] === 1) { $('drawing').hidden = false; setupPad(); }
  $('example').addEventListener('click', () => example(false));
  if (model.generates) { $('generate').hidden = false; $('generate').addEventListener('click', () => example(true)); }
  $('file').addEventListener('change', async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    const data = await readFile(file);
    payload = file.name.toLowerCase().endsWith('.npy') ? { npy_base64: data } : { png_base64: data };
    $('text').value = `(${file.name})`;
  });
  $('text').addEventListener('input', () => { payload = null; });
  $('submit').addEventListener('click', think);
  $('tick').addEventListener('input', render);
  $('head').addEventListener('change', render);
}

start();
