#!/usr/bin/env bash
# The benchmark environment of bench/peers.py: the package (editable, with its test extra),
# the peers it is compared with, and matplotlib. None of them is a runtime dependency.
# usage: bench-venv.sh PYTHON DIR
set -euo pipefail
python="$1" dir="$2"
bash "$(dirname "$0")/venv.sh" "$python" "$dir" python-consul2
# One at a time, so that a peer that cannot be installed here is reported (bench/peers.py
# states it in its output) and does not stop the others.
for peer in celery-redbeat single-beat celery-once celery-singleton matplotlib; do
  "$dir/bin/python" -m pip install -q "$peer" || echo "bench-venv: could not install $peer" >&2
done
"$dir/bin/python" -m pip list 2>/dev/null | grep -Ei '^(celery|celery-redbeat|single-beat|celery-once|celery-singleton|matplotlib|redis) ' || true
