#!/usr/bin/env bash
# Create a virtualenv with the package installed editable and the developer tools (the `dev`
# dependency group of pyproject.toml: tests, examples, lint and release check).
# usage: venv.sh PYTHON DIR CLIENT [PIP_ARGS...]   (CLIENT: python-consul2 or py-consul)
# PIP_ARGS are extra requirements installed with the package, e.g. 'celery==5.3.6' (make test-matrix).
set -euo pipefail
python="$1" dir="$2" client="$3"
shift 3

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "venv: $python is older than 3.10; run make with PYTHON=python3.1x" >&2; exit 1
fi
if ! "$python" -m venv "$dir" >/dev/null 2>&1; then
  rm -rf "$dir"
  # Debian and Ubuntu ship `venv` separately.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get -qq update && apt-get -qq install -y python3-venv >/dev/null
    "$python" -m venv "$dir"
  else
    echo "venv: '$python -m venv' failed; install your distribution's venv package (Debian/Ubuntu: sudo apt-get install python3-venv)" >&2
    exit 1
  fi
fi
# Dependency groups (`--group`, PEP 735) need pip 25.1 or later.
"$dir/bin/python" -m pip install -q --upgrade 'pip>=25.1'
"$dir/bin/python" -m pip install -q -e . --group dev "$@"
if [ "$client" = py-consul ]; then
  # Same `consul` module, so the two cannot be installed side by side: remove both (an
  # upgrade may have installed python-consul2's files over py-consul's), then py-consul.
  "$dir/bin/python" -m pip uninstall -q -y python-consul2 py-consul
  "$dir/bin/python" -m pip install -q py-consul "$@"
fi
"$dir/bin/python" -c 'import consul.base, importlib.metadata as m; print("venv: consul client", [d for d in ("python-consul2", "py-consul") if any(x.metadata["Name"] == d for x in m.distributions())])'
