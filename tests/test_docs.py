"""The documentation (README.md, docs/*.md): its code stays code that runs against the package.

The strict site build (`make docs`) checks the pages' links and anchors; these check what it
does not: the code blocks, and the README's links into the site (the README is not a page of
the site). The quotes of the example projects are checked in test_examples.py, the settings
table and the task options table in test_settings.py, the user's test of docs/testing.md in
test_pytest_plugin.py.
"""

from __future__ import annotations

import ast
import importlib
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: A fenced Python block, at any indentation (inside a list item too).
PYTHON_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for m in PYTHON_BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            blocks.append((f"{page.relative_to(ROOT)}:{line}", textwrap.dedent(m[2])))
    return blocks


def test_the_docs_have_python_blocks_to_check():
    assert len(python_blocks()) >= 20


@pytest.mark.parametrize(("where", "code"), python_blocks(), ids=[where for where, _ in python_blocks()])
def test_each_python_block_of_the_docs_is_valid_python_whose_imports_of_the_package_exist(where, code):
    tree = ast.parse(code, where)  # a SyntaxError names the page and line
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "celery_consul_lock":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub (and the site, with pymdownx.slugs) gives the headings of a page."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    headings = re.findall(r"^#{1,6} (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_readmes_links_into_the_site_reach_a_page_and_its_heading():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs/|CHANGELOG|LICENSE)[^)#]*)(?:#([^)]+))?\)", readme)
    assert {"docs/index.md", "docs/getting-started.md", "docs/configuration.md", "docs/api.md"} <= {p for p, _ in links}
    for path, anchor in links:
        target = ROOT / path
        assert target.is_file(), f"README links to {path}, which does not exist"
        if anchor:
            assert anchor in github_anchors(target.read_text()), f"README links to {path}#{anchor}: no such heading"
