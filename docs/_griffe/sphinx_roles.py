"""A Griffe extension for the documentation site: Sphinx roles in docstrings become links.

llmbatch's docstrings are Google-style with Sphinx cross-reference roles
(``:class:`~llmbatch.limits.Limits```, ``:meth:`open```). mkdocstrings renders Markdown,
where a role would show as the literal text ``:class:`` followed by code. This extension
rewrites each role into an *optional* mkdocs-autorefs reference: a link when the target
is rendered somewhere on the site, plain code (and no warning, so ``--strict`` holds)
when it is not.

Targets are resolved as Sphinx does: a dotted path as written, else the name relative to
the object's class and module. ``~`` shows only the last part of the path.

Used from ``mkdocs.yml`` (``extensions: [docs/_griffe/sphinx_roles.py:SphinxRoles]``);
the file is excluded from the site.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

__all__ = ["SphinxRoles", "rewrite"]

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const|type):`"
    r"(?:(?P<title>[^`<]+?)\s*<~?(?P<explicit>[A-Za-z_][\w.]*)>"
    r"|(?P<tilde>~?)(?P<target>[A-Za-z_][\w.]*)(?P<call>\(\))?)`"
)


def _exists(collection: griffe.ModulesCollection, path: str) -> bool:
    try:
        collection.get_member(path)
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _resolve(obj: griffe.Object, target: str) -> str:
    """The full path *target* names from *obj*'s docstring (as written if unknown)."""
    collection = obj.modules_collection
    scope: griffe.Object | None = obj
    while scope is not None:
        candidate = f"{scope.path}.{target}"
        if _exists(collection, candidate):
            return candidate
        scope = scope.parent
    return target


def rewrite(obj: griffe.Object, text: str) -> str:
    """*text* with its Sphinx roles turned into optional autorefs."""

    def link(match: re.Match[str]) -> str:
        if match["explicit"]:  # :meth:`the title <the.target>`
            path = _resolve(obj, match["explicit"].strip("."))
            title = match["title"]
        else:
            target = match["target"].strip(".")
            path = _resolve(obj, target)
            title = target.rsplit(".", 1)[-1] if match["tilde"] else target
            title += match["call"] or ""
        return (
            f'<autoref identifier="{html.escape(path)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>"
        )

    return _ROLE.sub(link, text)


def _walk(obj: griffe.Object) -> None:
    if obj.docstring is not None and ":" in obj.docstring.value:
        obj.docstring.value = rewrite(obj, obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            _walk(member)


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles of every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Called once the whole package is loaded (every target can be looked up)."""
        _walk(pkg)
