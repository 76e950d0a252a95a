#!/usr/bin/env bash
# make test-matrix: the task and beat scenario tests against the oldest and newest releases we
# claim, with both Consul client libraries, each cell in a virtualenv of its own
# (.venv-matrix-<cell>), one cell after another. Not part of `make test` (CI runs `make test`):
# a cell takes minutes, and the newest releases change under it.
#
# usage: matrix.sh PYTHON [PYTEST_ARGS...]
# Cells (name | Consul client | pins): the "oldest" pins are the floors of pyproject.toml
# (celery>=5.3, django-celery-beat>=2.5) with a redis-py of their time (<5: celery 5.3.0's
# result backend calls get_connection with arguments redis-py 5.3 deprecated, a warning the
# suite turns into an error); "newest" upgrades to the newest on every run.
set -uo pipefail
set -f  # the pins hold brackets (celery[redis]): no globbing
cd "$(dirname "$0")/.."
python="$1"; shift

files=(tests/test_internals.py tests/test_eager.py tests/test_task.py tests/test_beat.py)
cells=(
  "oldest-python-consul2|python-consul2|celery[redis]==5.3.0 redis<5 django-celery-beat==2.5.0"
  "oldest-py-consul|py-consul|celery[redis]==5.3.0 redis<5 django-celery-beat==2.5.0"
  "newest-python-consul2|python-consul2|--upgrade celery[redis] django-celery-beat python-consul2"
  "newest-py-consul|py-consul|--upgrade celery[redis] django-celery-beat py-consul"
)
results=()
status=0
for cell in "${cells[@]}"; do
  IFS='|' read -r name client pins <<<"$cell"
  dir=".venv-matrix-$name"
  stamp="$dir/.installed"
  # shellcheck disable=SC2086  # pins are several words
  if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$pins" ] || [[ "$pins" == --upgrade* ]]; then
    if ! bash scripts/venv.sh "$python" "$dir" "$client" $pins >"$dir.log" 2>&1; then
      echo "matrix: $name: could not install (see $dir.log)" >&2
      results+=("$name: INSTALL FAILED"); status=1; continue
    fi
    echo "$pins" >"$stamp"
  fi
  versions="$("$dir/bin/python" -c 'import importlib.metadata as m, sys
names = ["celery", "kombu", "redis", "django-celery-beat", "Django", "python-consul2", "py-consul"]
print(f"Python {sys.version.split()[0]}, " + ", ".join(f"{n} {m.version(n)}" for n in names if any(d.metadata["Name"].lower() == n.lower() for d in m.distributions())))')"
  echo "== matrix $name: $versions"
  start=$SECONDS
  if "$dir/bin/python" -m pytest -q "${files[@]}" "$@"; then verdict=passed; else verdict=FAILED; status=1; fi
  results+=("$name ($versions): $verdict in $((SECONDS - start)) s")
done
echo
echo "test-matrix (${files[*]}):"
printf '  %s\n' "${results[@]}"
exit $status
