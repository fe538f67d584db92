"""A griffe extension for the API reference (mkdocs.yml loads it; it is not shipped).

The package's docstrings are Google style with two habits the Google parser
does not know:

* ``Example:`` (singular) heads doctest examples; the parser would render it
  as an admonition of Markdown text, so ``>>>`` lines became block quotes. It
  is read as ``Examples:``, whose doctest lines render as Python code.
* Sphinx roles (``:class:`~pkg.Name```, ``:func:``, ``:mod:``, ...) are shown
  as inline code: ``Name`` with a leading ``~``, else the full dotted path.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class DocstringHabits(griffe.Extension):
    """Rewrites each docstring's text before it is parsed (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        text = _EXAMPLE.sub(r"\1Examples:", docstring.value)
        docstring.value = _ROLE.sub(_role, text)
