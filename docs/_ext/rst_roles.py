"""A griffe extension for the API reference: the docstrings' reST markup, rendered as Markdown.

The package's docstrings are Google style with reST inline markup (``:class:`CommitPolicy```,
``Configure it::``), which reads well in ``help()`` and IDEs; mkdocstrings renders Markdown. Here a
role becomes a code span (``:meth:`~x.init_app``` -> ```init_app```) and a trailing ``::`` a colon
before its (indented, so already code) block. Nothing else is changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|exc|data|obj|const):`(?P<target>[^`]+)`")
LITERAL_BLOCK = re.compile(r"::$", flags=re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    target = match.group("target")
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def markdown(text: str) -> str:
    """The docstring ``text`` with its reST roles and literal-block markers as Markdown."""
    return LITERAL_BLOCK.sub(":", ROLE.sub(_role, text))


class RstRoles(griffe.Extension):
    """Rewrites each docstring once, when griffe creates its object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
