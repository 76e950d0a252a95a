"""The documentation (README.md, docs/*.md): its code and commands stay those of the package.

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


def shell_texts() -> list[tuple[str, str]]:
    """The inline code and the sh blocks of the pages, where commands are written."""
    found = []
    for page in PAGES:
        text = page.read_text()
        found += [(page.name, m) for m in re.findall(r"```sh\n(.*?)```", text, re.S)]
        found += [(page.name, m) for m in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]
    return found


def test_the_make_targets_and_consul_lock_commands_the_docs_name_exist():
    from celery_consul_lock.command import consul_lock

    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    commands = set(consul_lock.commands)
    named_targets, named_commands = set(), set()
    for page, text in shell_texts():
        for target in re.findall(r"(?:^|[\s;(])make ([a-z][\w-]*)", text, re.M):
            named_targets.add(target)
            assert target in targets, f"{page} runs `make {target}`, which the Makefile does not have"
        for command in re.findall(r"(?<![\w-])consul-lock ([a-z][\w-]*)", text):
            named_commands.add(command)
            assert command in commands, f"{page} runs `consul-lock {command}`; the command has {sorted(commands)}"
    assert {"demo", "test", "docs"} <= named_targets and {"status", "release", "check"} <= named_commands


def markdown_differences(text: str) -> list[str]:
    """Lines GitHub and the site (Python-Markdown) render differently: a heading, a list or a
    table right after a paragraph or table line (the site needs a blank line between), a nested list item or a
    list item's code block or paragraph indented by 1 to 3 spaces (the site needs 4)."""
    found, fence, in_list, prev = [], False, False, ""
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            if not fence and re.match(r" {1,3}\S", line):
                found.append(f"{number}: a list item's code block needs an indent of 4: {line.strip()}")
            fence, prev = not fence, line
            continue
        if fence:
            continue
        item = re.match(r"( *)([-*+]|\d+\.) ", line)
        if line.startswith("#") and prev.strip():
            found.append(f"{number}: a blank line is needed before this heading: {line.strip()[:50]}")
        elif item:
            if prev.strip() and not in_list:
                found.append(f"{number}: a blank line is needed before this list: {line.strip()[:50]}")
            if 0 < len(item[1]) < 4:
                found.append(f"{number}: a nested list item needs an indent of 4: {line.strip()[:50]}")
            in_list = True
        elif line.startswith("|") and prev.strip() and not prev.startswith("|"):
            found.append(f"{number}: a blank line is needed before this table: {line.strip()[:50]}")
        elif line.strip() and not prev.strip():
            if re.match(r" {1,3}\S", line):
                found.append(f"{number}: a list item's paragraph needs an indent of 4: {line.strip()[:50]}")
            in_list = in_list and line.startswith(" ")
        prev = line
    return found


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda page: page.name)
def test_each_page_renders_the_same_on_github_and_in_the_site(page):
    assert markdown_differences(page.read_text()) == []


def test_the_markdown_check_finds_what_the_site_renders_differently():
    assert markdown_differences("Text:\n- item\n") == ["2: a blank line is needed before this list: - item"]
    assert markdown_differences("Text.\n\n- item\n  - nested\n")[0].startswith("4: a nested list item")
    assert markdown_differences("- item\n\n  ```sh\n  make demo\n  ```\n")[0].startswith("3: a list item's code block")
    assert markdown_differences("Text:\n| a |\n|---|\n")[0].startswith("2: a blank line is needed before this table")
    assert markdown_differences("| a |\n|---|\n## Next\n")[0].startswith("3: a blank line is needed before this heading")
    fine = "Text:\n\n- item\n  lazy continuation\n- item\n\n    ```sh\n    make demo\n    ```\n\n    More.\n"
    assert markdown_differences(fine) == []


def test_the_api_reference_shows_every_public_name():
    """docs/api.md has a `::: celery_consul_lock.<name>` entry for each name of `__all__`, so a
    name added to the public API shows in the reference (`__version__` is a string)."""
    import celery_consul_lock

    shown = set(re.findall(r"^::: celery_consul_lock\.(\w+)\s*$", (ROOT / "docs" / "api.md").read_text(), re.M))
    assert set(celery_consul_lock.__all__) - {"__version__"} - shown == set()
