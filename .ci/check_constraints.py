"""Fails when the venv holds a package at another version than constraints.txt
pins, or one it does not pin: constraints.txt must be exactly what CI tested.
Regenerate it (in a venv with `pip install -e ".[all]"`) with:
  pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$//' > constraints.txt
"""

import importlib.metadata
import re
import sys


def pins(path: str) -> dict[str, str]:
  out = {}
  for line in open(path, encoding='utf-8'):
    line = line.split('#')[0].strip()
    if line:
      name, version = line.split('==')
      out[normalise(name)] = version.strip()
  return out


def normalise(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def installed() -> dict[str, str]:
  skip = {'pip', 'setuptools', 'wheel', 'ctm-jax'}
  out = {}
  for dist in importlib.metadata.distributions():
    name = normalise(dist.metadata['Name'])
    if name not in skip:
      out[name] = dist.version.split('+')[0]  # torch's local tag (+cpu)
  return out


def main(path: str) -> int:
  want, have = pins(path), installed()
  problems = [f'{name}=={version} installed, {path} pins {want.get(name, "nothing")}'
              for name, version in sorted(have.items()) if want.get(name) != version]
  problems += [f'{name}: pinned {version}, not installed' for name, version in sorted(want.items())
               if name not in have]
  for line in problems:
    print(f'{path}: {line}', file=sys.stderr)
  if problems:
    print(f'{path} is not what CI tested; regenerate it (see .ci/check_constraints.py)',
          file=sys.stderr)
  else:
    print(f'{path}: the {len(want)} installed packages are the pinned versions')
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
