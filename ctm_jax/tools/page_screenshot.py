"""A screenshot of the serving page thinking on one held-out example.

  python -m ctm_jax.tools.page_screenshot --workdir=runs/parity_small \\
      --out=docs/images/page_parity.png [--example=0] [--tick=N] [--threshold=0.9]

Starts `python -m ctm_jax.serve` on a free loopback port, opens its page in
Debian's chromium (driven by Playwright: the `browser` extra), picks held-out
example `--example` (the page's `?seed=`), lets the model think, moves the tick slider to `--tick`
(default: halfway to the stopping tick) and saves the page as a PNG. The
README's picture of the page is made this way.
"""

import os
import shutil

from ctm_jax import extras
from ctm_jax import serve
from ctm_jax import validation

# Quiet, offline, sandbox-free (containers run as root): the page needs nothing else.
CHROMIUM_ARGS = ('--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync')


def chromium_path() -> str | None:
  return shutil.which('chromium') or shutil.which('chromium-browser')


def launch(playwright, chromium: str):
  """A headless chromium at `chromium` under Playwright."""
  return playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))


def think(page, url: str, *, example: int = 0, threshold: float | None = None, tick: int | None = None) -> int:
  """Opens the page at `url`, submits held-out example `example`, and moves
  the slider to `tick` (default halfway); returns the ticks the answer used."""
  page.goto(f'{url}/?seed={example}')
  page.wait_for_function("!document.getElementById('model').textContent.startsWith('loading')")
  page.click('#example')
  page.wait_for_function("document.getElementById('text').value.length > 0")
  if threshold is not None:
    page.fill('#threshold', str(threshold))
  page.click('#submit')
  page.wait_for_selector('#result:not([hidden]), #error:not([hidden])')
  if page.is_visible('#error'):
    raise validation.UsageError(f'the page showed an error: {page.text_content("#error")}')
  ticks = int(page.get_attribute('#tick', 'max'))
  at = max(1, (ticks + 1) // 2) if tick is None else min(max(tick, 1), ticks)
  page.eval_on_selector('#tick', f"e => {{ e.value = {at}; e.dispatchEvent(new Event('input')); }}")
  return ticks


def _run(values):
  sync_api = extras.module('playwright.sync_api', 'python -m ctm_jax.tools.page_screenshot')
  chromium = chromium_path()
  if chromium is None:
    raise validation.UsageError('chromium: not on PATH; install it (Debian: apt-get install chromium)')
  out = os.path.abspath(values.out)
  if not out.endswith('.png'):
    raise validation.UsageError(f'--out={values.out}: a .png path')
  if os.path.exists(out) and not values.overwrite:
    raise validation.UsageError(f'--out={values.out}: exists; pass --overwrite to replace it')
  if not os.path.isdir(os.path.dirname(out)):
    raise validation.UsageError(f'--out={values.out}: no folder {os.path.dirname(out)}')
  try:
    server = serve.Child(values.workdir, timeout=values.timeout)
  except serve.ChildFailed as e:
    raise validation.UsageError(f'the server {e.why}: {e.last_line}') from None
  url = server.url
  try:
    with sync_api.sync_playwright() as playwright:
      browser = launch(playwright, chromium)
      try:
        page = browser.new_page(viewport={'width': values.width, 'height': values.height})
        ticks = think(page, url, example=values.example, threshold=values.threshold, tick=values.tick)
        page.screenshot(path=out, full_page=True)
      finally:
        browser.close()
  finally:
    server.stop()
  print(f'wrote {out} (example {values.example}, answered in {ticks} ticks)')


def main():
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'A training run, an artefact, an import or hf://ORG/NAME.', required=True)
  flags.DEFINE_string('out', None, 'The PNG to write.', required=True)
  flags.DEFINE_integer('example', 0, 'Which held-out example (the seed of GET /v1/examples).')
  flags.DEFINE_integer('tick', None, 'The tick the slider shows (default: halfway to the stopping tick).')
  flags.DEFINE_float('threshold', None, 'Certainty to stop at (default: the server\'s).')
  flags.DEFINE_integer('width', 1200, 'Browser window width.')
  flags.DEFINE_integer('height', 900, 'Browser window height.')
  flags.DEFINE_float('timeout', 300.0, 'Seconds the server may take to start.')
  flags.DEFINE_bool('overwrite', False, 'Replace a PNG already at --out.')
  app.run(validation.command('ctm_jax.tools.page_screenshot', _run))


if __name__ == '__main__':
  main()
