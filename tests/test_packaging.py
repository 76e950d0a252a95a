"""The package's release metadata as an installed copy sees it."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import celery_consul_lock

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_installed_distributions_and_pyprojects():
    pyproject = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert celery_consul_lock.__version__ == importlib.metadata.version("celery-consul-lock")
    assert celery_consul_lock.__version__ == pyproject[1]
    assert "__version__" in celery_consul_lock.__all__


def test_the_changelog_has_a_section_for_the_current_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"\n## {celery_consul_lock.__version__} " in changelog


def test_the_installed_metadata_names_the_licence_and_the_frameworks():
    meta = importlib.metadata.metadata("celery-consul-lock")
    assert meta["License-Expression"] == "MIT"
    classifiers = meta.get_all("Classifier")
    for wanted in ("Framework :: Celery", "Framework :: Django", "Framework :: Flask", "Typing :: Typed"):
        assert wanted in classifiers
    # Developer tools are dependency groups, not a published extra.
    assert set(meta.get_all("Provides-Extra")) == {"django", "flask"}
