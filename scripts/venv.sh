#!/usr/bin/env bash
# Create a virtualenv with the package installed editable and the developer tools (the `dev`
# dependency group of pyproject.toml: tests, examples, lint and release check, the docs site).
# usage: venv.sh PYTHON DIR [PIP_ARGS...]
# PIP_ARGS are extra requirements installed with the package, e.g. 'celery==5.3.6' (make test-matrix).
set -euo pipefail
python="$1" dir="$2"
shift 2

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
"$dir/bin/python" -c 'import celery, celery_consul_lock, importlib.metadata as m; print("venv: celery-consul-lock", m.version("celery-consul-lock"), "with celery", celery.__version__)'
