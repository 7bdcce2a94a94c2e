"""Prints one of README.md's two commands, as written there: `train` (install
and train) or `test` (install and test). CI runs what this prints, so README
and CI cannot drift apart (tests/packaging_test.py checks both ends)."""

import pathlib
import re
import sys

SECTION = '## The two commands'
NAMES = ('train', 'test')


def commands(readme: str) -> dict[str, str]:
  """{'train': ..., 'test': ...}: the one-line bash blocks of README's section, in order."""
  start = readme.index(SECTION)
  end = readme.find('\n## ', start + len(SECTION))
  section = readme[start : end if end != -1 else None]
  blocks = re.findall(r'```bash\n(.*?)```', section, re.S)
  lines = [block.strip() for block in blocks]
  if len(lines) != len(NAMES) or any('\n' in line for line in lines):
    raise ValueError(f'README.md {SECTION!r}: expected {len(NAMES)} one-line bash blocks, got {lines}')
  return dict(zip(NAMES, lines))


if __name__ == '__main__':
  readme = (pathlib.Path(__file__).resolve().parents[1] / 'README.md').read_text()
  print(commands(readme)[sys.argv[1]])
