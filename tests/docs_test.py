"""The docs agree with the tree: docs/layout.md names every file, each config
gives its run command, and every relative markdown link resolves.

Pure file reading (no jax), so it runs in well under a second.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYOUT = ROOT / 'docs' / 'layout.md'
# Config files that are not runs: shared pieces and the package marker.
NOT_RUNS = ('__init__.py', 'common.py', 'models.py')


def files_to_list():
  """Paths (relative to the root) that docs/layout.md must name."""
  paths = [
      p for p in (ROOT / 'ctm_jax').rglob('*.py')
      if p.name != '__init__.py' and '__pycache__' not in p.parts
  ]
  for directory in ('configs', 'benchmarks', 'launch'):
    paths += [p for p in (ROOT / directory).iterdir() if p.is_file()]
  return sorted(p.relative_to(ROOT).as_posix() for p in paths)


def layout_entries(text):
  """{first column of a line: the text of that entry (its continuation lines too)}.

  An entry starts at an unindented line of the code block; lines indented to
  the description column continue it.
  """
  block = re.search(r'```\n(.*?)```', text, re.S)
  assert block, 'docs/layout.md has no code block'
  entries = {}
  name = None
  for line in block.group(1).splitlines():
    if line and not line[0].isspace():
      name, _, rest = line.partition(' ')
      entries[name] = rest
    elif name is not None:
      entries[name] += ' ' + line.strip()
  return entries


def missing_from_layout(text):
  entries = layout_entries(text)
  missing = []
  for path in files_to_list():
    if path in entries:
      continue
    # A `dir/` entry lists its files by name; a subdirectory's files may be
    # named under any enclosing `dir/` entry.
    parent, name = path.rsplit('/', 1)
    parts = parent.split('/')
    named = re.compile(rf'(?<![\w.]){re.escape(name)}(?!\w)')
    listed = any(
        named.search(entries.get('/'.join(parts[:i]) + '/', ''))
        for i in range(len(parts), 0, -1)
    )
    if not listed:
      missing.append(path)
  return missing


def test_layout_names_every_file():
  missing = missing_from_layout(LAYOUT.read_text())
  assert not missing, f'docs/layout.md does not name: {", ".join(missing)}'


def test_layout_check_catches_an_omission():
  # Drop the line of one listed file and of one file named in a `dir/` entry.
  text = LAYOUT.read_text()
  without = re.sub(r'\nctm_jax/extras\.py [^\n]*', '\n', text)
  without = without.replace('rl_bench.py', 'rl_bench')
  assert set(missing_from_layout(without)) == {'ctm_jax/extras.py', 'benchmarks/rl_bench.py'}


def config_files():
  return sorted(p.name for p in (ROOT / 'configs').glob('*.py') if p.name not in NOT_RUNS)


def missing_run_command(path):
  """None if the module docstring gives `python -m ctm_jax.main --config=configs/<file>`."""
  doc = ast.get_docstring(ast.parse(path.read_text())) or ''
  pattern = rf'python -m ctm_jax\.main --config=configs/{re.escape(path.name)}(?![\w.])'
  return None if re.search(pattern, doc) else path.name


@pytest.mark.parametrize('name', config_files())
def test_config_docstring_gives_its_run_command(name):
  # README: every config file's docstring gives its exact run command.
  assert missing_run_command(ROOT / 'configs' / name) is None, (
      f'configs/{name} docstring lacks `python -m ctm_jax.main --config=configs/{name}...`'
  )


def test_run_command_check_catches_an_omission(tmp_path):
  path = tmp_path / 'parity.py'
  source = (ROOT / 'configs' / 'parity.py').read_text()
  path.write_text(source.replace('python -m ctm_jax.main --config=configs/parity.py', 'python x'))
  assert missing_run_command(path) == 'parity.py'
  # Another config's command does not count.
  path.write_text(source.replace('configs/parity.py:small', 'configs/parity.pyc'))
  assert missing_run_command(path) == 'parity.py'


def github_anchor(heading):
  """GitHub's anchor of a heading: lowercase, markup and punctuation other
  than hyphens and underscores dropped, spaces to hyphens."""
  text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link keeps its text
  text = re.sub(r'[^\w\- ]', '', text.strip().lower())
  return text.replace(' ', '-')


def anchors(path):
  """Every heading's anchor in a markdown file (a repeated one gets -1, -2, ...)."""
  found, seen = set(), {}
  in_code = False
  for line in path.read_text().splitlines():
    if line.startswith('```'):
      in_code = not in_code
    match = None if in_code else re.match(r'#{1,6} +(.*?)#*\s*$', line)
    if match:
      anchor = github_anchor(match.group(1))
      count = seen.get(anchor, 0)
      seen[anchor] = count + 1
      found.add(anchor if count == 0 else f'{anchor}-{count}')
  return found


def markdown_files():
  return [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


def broken_links(path):
  """The relative links of a markdown file whose file or heading does not exist."""
  text = re.sub(r'```.*?```', '', path.read_text(), flags=re.S)
  text = re.sub(r'`[^`\n]*`', '', text)
  broken = []
  for target in re.findall(r'\]\(([^)\s]+)(?:\s+"[^"]*")?\)', text):
    if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
      continue
    file_part, _, anchor = target.partition('#')
    linked = (path.parent / file_part).resolve() if file_part else path
    if not linked.exists():
      broken.append(target)
    elif anchor and linked.suffix == '.md' and anchor not in anchors(linked):
      broken.append(target)
  return broken


@pytest.mark.parametrize('name', [p.relative_to(ROOT).as_posix() for p in markdown_files()])
def test_relative_links_resolve(name):
  broken = broken_links(ROOT / name)
  assert not broken, f'{name}: links to no file or heading: {", ".join(broken)}'


def test_github_anchor_rules():
  assert github_anchor('CPU, same run as the reference') == 'cpu-same-run-as-the-reference'
  assert github_anchor('Size a run first: compile_check') == 'size-a-run-first-compile_check'
  assert github_anchor('Early exit (2026-11-26, commit `17ea5ac`)') == (
      'early-exit-2026-11-26-commit-17ea5ac'
  )


def test_link_check_catches_a_broken_link(tmp_path):
  (tmp_path / 'other.md').write_text('# A heading\n\n## Same\n\n## Same\n')
  page = tmp_path / 'page.md'
  page.write_text(
      '# Top\n[ok](other.md) [ok](other.md#a-heading) [ok](#top) [ok](other.md#same-1)\n'
      '[web](https://example.com/x.md) `[code](nothing.md)`\n'
      '[gone](missing.md) [bad](other.md#no-such) [bad](#nowhere)\n'
  )
  assert broken_links(page) == ['missing.md', 'other.md#no-such', '#nowhere']


# Measured figures in README must come from a dated record; these are not measurements.
_NOT_MEASURED = {'2505.05522', '3.11'}  # the paper's arXiv id; the Python floor
_RECORDS = ('docs/results.md', 'docs/performance.md', 'docs/scaling.md')


def readme_figures(text: str) -> set[str]:
  """Decimals, percentages and thousands in README's prose and tables (not in
  code, inline code or link targets)."""
  text = re.sub(r'```.*?```', '', text, flags=re.S)
  text = re.sub(r'`[^`]*`', '', text)
  text = re.sub(r'\]\([^)]*\)', ']', text)
  return set(re.findall(r'(?<![\w.-])(\d+\.\d+|\d{1,3}(?:,\d{3})+|\d+(?=%))', text))


def test_every_readme_figure_is_in_a_dated_record():
  records = ''.join((ROOT / path).read_text() for path in _RECORDS)
  missing = sorted(readme_figures((ROOT / 'README.md').read_text()) - _NOT_MEASURED - {
      figure for figure in readme_figures((ROOT / 'README.md').read_text()) if figure in records})
  assert not missing, f'README quotes figures no record in {_RECORDS} holds: {missing}'


def test_figure_check_finds_figures_outside_code():
  text = 'a 98.9% run in 50.8 s, 2,603 steps/s, `1.5` and [x](a-1.2.md)\n```\n7.7\n```\n'
  assert readme_figures(text) == {'98.9', '50.8', '2,603'}
