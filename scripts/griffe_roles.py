"""A griffe extension for the API reference (mkdocs.yml, mkdocstrings): the docstrings are
written in reStructuredText's manner, which Markdown shows as raw text. Three of its forms are
turned into Markdown:

- a Sphinx role (``:class:`ConsulSettings```, ``:meth:`~x.Y.z```) becomes a link to the
  object's entry when docs/api.md shows it, and inline code otherwise (a link to an object the
  reference does not show would break the strict build);
- a definition list (a line, then lines indented by four spaces) becomes a Markdown one
  (the ``def_list`` extension);
- a literal block's ``::`` becomes ``:`` (the indented block after it is code in both).

It also reads an attribute's ``#:`` comment lines (Sphinx's form, used for the constants and
the fields of the dataclasses) as its docstring, which griffe does not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

#: ``:role:`target``` with an optional ``~`` (show the last name only).
ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([\w.]+)`")
#: A term line right after a blank line (or the start), then its definition indented by 4.
DEFINITION = re.compile(r"(?:\A|(?<=\n\n))(\S[^\n]*)\n((?: {4}\S[^\n]*(?:\n|\Z))+)")
#: The reference's entries, ``::: identifier`` lines.
ENTRY = re.compile(r"^::: ([\w.]+)\s*$", re.M)
API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


class SphinxRoles(griffe.Extension):
    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or not attr.lineno:
            return
        lines = attr.module.lines
        first = attr.lineno - 1  # the comment lines right above the assignment
        while first > 0 and lines[first - 1].strip().startswith("#:"):
            first -= 1
        if first < attr.lineno - 1:
            text = "\n".join(line.strip()[2:].strip() for line in lines[first : attr.lineno - 1])
            attr.docstring = griffe.Docstring(text, lineno=first + 1, parent=attr)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        shown = _shown_entries(pkg)
        for obj in _walk(pkg):
            if obj.docstring is not None:
                text = ROLE.sub(lambda m, o=obj: _link(o, m[1] == "~", m[2], shown), obj.docstring.value)
                text = DEFINITION.sub(_definition, text)
                obj.docstring.value = re.sub(r"::\n\n", ":\n\n", text)


def _definition(m: re.Match[str]) -> str:
    lines = [line[4:] for line in m[2].rstrip("\n").split("\n")]
    ending = "\n" if m[2].endswith("\n") else ""
    return f"{m[1]}\n:   " + "\n    ".join(lines) + ending


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias and member.parent is obj:
            found.extend(_walk(member))  # type: ignore[arg-type]
    return found


def _shown_entries(pkg: griffe.Module) -> dict[str, str]:
    """The canonical path of each object docs/api.md shows (an entry, or a public member with a
    docstring of an entry) -> the identifier its heading has there."""
    shown: dict[str, str] = {}
    for identifier in ENTRY.findall(API_PAGE.read_text()):
        try:
            obj = pkg.modules_collection[identifier]
        except KeyError:
            continue
        target = obj.final_target if obj.is_alias else obj
        shown[target.path] = identifier
        for name, member in target.members.items():
            if not name.startswith("_") and not member.is_alias and member.docstring is not None:
                shown[f"{target.path}.{name}"] = f"{identifier}.{name}"
    return shown


def _canonical(obj: griffe.Object, target: str) -> str | None:
    if target.startswith("."):
        package = obj.package.path if obj.is_module else obj.module.package.path
        return package + target
    first, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            path = scope.resolve(first)
        except (griffe.NameResolutionError, ValueError):
            scope = scope.parent
            continue
        return f"{path}.{rest}" if rest else path
    return target if target.startswith(obj.package.path) else None


def _link(obj: griffe.Object, short: bool, target: str, shown: dict[str, str]) -> str:
    text = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
    path = _canonical(obj, target)
    if path is not None:
        try:
            found = obj.package.modules_collection[path]
            path = (found.final_target if found.is_alias else found).path
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            pass
    if path in shown:
        return f"[`{text}`][{shown[path]}]"
    return f"`{text}`"
