"""Check what the built sdist and wheel carry (run by `make lint` after `python -m build`).

usage: python scripts/check_dist.py DIST_DIR

The wheel: the package, its ``py.typed``, the licence, and nothing from the repository's
tests, examples or benchmarks. The sdist: the same, plus the files that describe the
package, and no tests (they need a clone: see MANIFEST.in). Exits 1 naming what is wrong.
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

FOREIGN = ("tests/", "bench/", "example_project/", "scripts/", "docs/")


def main(dist: Path) -> int:
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    problems = []
    names = zipfile.ZipFile(wheel).namelist()
    for wanted in ("celery_consul_lock/__init__.py", "celery_consul_lock/py.typed"):
        if wanted not in names:
            problems.append(f"{wheel.name}: no {wanted}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append(f"{wheel.name}: no licence file (.dist-info/licenses/LICENSE)")
    problems += [f"{wheel.name}: carries {n}" for n in names if n.startswith(FOREIGN)]
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        files = [n.removeprefix(root + "/") for n in tar.getnames()]
    for wanted in ("LICENSE", "CHANGELOG.md", "README_PYPI.md", "pyproject.toml", "celery_consul_lock/py.typed"):
        if wanted not in files:
            problems.append(f"{sdist.name}: no {wanted}")
    problems += [f"{sdist.name}: carries {n}" for n in files if n.startswith(FOREIGN)]
    for problem in problems:
        print("check_dist:", problem, file=sys.stderr)
    if not problems:
        print(f"check_dist: {wheel.name} ({len(names)} files) and {sdist.name} ({len(files)} files) OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
