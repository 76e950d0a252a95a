#!/usr/bin/env bash
# make test-matrix: the task and beat scenario tests against the oldest and newest releases we
# claim, each cell in a virtualenv of its own
# (.venv-matrix-<cell>), one cell after another. Not part of `make test` (CI runs `make test`):
# a cell takes minutes, and the newest releases change under it.
#
# usage: matrix.sh PYTHON [PYTEST_ARGS...]
# Cells (name | pins | extra pytest arguments): the "oldest" pins are the
# floors of pyproject.toml (celery>=5.3, django-celery-beat>=2.5), with the kombu and redis-py
# pip resolves for them today, as a user gets them; "newest" upgrades everything on every run.
# Celery 5.3.0's AsyncResult.__del__ reconnects to the result backend when a result is
# garbage-collected, after the test's Redis has stopped, and raises there (not seen with
# 5.7.0); pytest reports that as an unraisable-exception warning, which the oldest cell
# ignores (no test's assertion is affected).
set -uo pipefail
set -f  # the pins hold brackets (celery[redis]): no globbing
cd "$(dirname "$0")/.."
python="$1"; shift

files=(tests/test_internals.py tests/test_eager.py tests/test_task.py tests/test_beat.py)
old_unraisable="-W ignore::pytest.PytestUnraisableExceptionWarning"
cells=(
  "oldest|celery[redis]==5.3.0 django-celery-beat==2.5.0|$old_unraisable"
  "newest|--upgrade celery[redis] django-celery-beat|"
)
results=()
status=0
for cell in "${cells[@]}"; do
  IFS='|' read -r name pins extra <<<"$cell"
  dir=".venv-matrix-$name"
  stamp="$dir/.installed"
  # shellcheck disable=SC2086  # pins are several words
  if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$pins" ] || [[ "$pins" == --upgrade* ]]; then
    if ! bash scripts/venv.sh "$python" "$dir" $pins >"$dir.log" 2>&1; then
      echo "matrix: $name: could not install (see $dir.log)" >&2
      results+=("$name: INSTALL FAILED"); status=1; continue
    fi
    echo "$pins" >"$stamp"
  fi
  versions="$("$dir/bin/python" -c 'import importlib.metadata as m, sys
names = ["celery", "kombu", "redis", "django-celery-beat", "Django"]
print(f"Python {sys.version.split()[0]}, " + ", ".join(f"{n} {m.version(n)}" for n in names if any(d.metadata["Name"].lower() == n.lower() for d in m.distributions())))')"
  echo "== matrix $name: $versions"
  start=$SECONDS
  # shellcheck disable=SC2086  # extra is several words
  if "$dir/bin/python" -m pytest -q $extra "${files[@]}" "$@"; then verdict=passed; else verdict=FAILED; status=1; fi
  results+=("$name ($versions): $verdict in $((SECONDS - start)) s")
done
echo
echo "test-matrix (${files[*]}):"
printf '  %s\n' "${results[@]}"
exit $status
