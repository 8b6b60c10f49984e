"""A griffe extension for the API reference: reST literal blocks become fenced code.

procession's docstrings are prose with reST-style literal blocks
(``Example::`` then an indented block), which read well in ``help()``.
mkdocstrings renders docstrings as Markdown, where ``Example::`` would show its
two colons and the block would lose its highlighting; this turns each such
block into a fenced ``python`` block, and double-backquoted ``code`` into
Markdown's single backquotes.  Loaded by mkdocs.yml (``extensions:``).
"""

from __future__ import annotations

import re
from typing import Any

try:
    import griffe
except ImportError:  # the test suite checks rest_to_markdown without the docs group
    griffe = None

_DOUBLE_BACKQUOTES = re.compile(r"``([^`]+)``")
# Sphinx roles (:func:`procession.map`, :class:`~x.Y`) read as plain code here.
_ROLES = re.compile(r":(?:func|meth|class|mod|attr|exc|data|obj):`~?([^`]+)`")


def rest_to_markdown(text: str) -> str:
    """Fence every reST literal block (a paragraph ending in ``::``) of ``text``."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and not line.lstrip().startswith((">>>", "$")):
            stripped = line.rstrip()[:-2].rstrip()
            # "Example::" -> "Example:"; "text::" alone on its line -> nothing lost
            out.append(stripped + ":" if stripped else "")
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            indents = [len(b) - len(b.lstrip()) for b in block if b.strip()]
            cut = min(indents, default=0)
            body = [b[cut:] for b in block]
            while body and not body[0].strip():
                body.pop(0)
            out.extend(["", "```python", *body, "```", ""])
            continue
        out.append(_ROLES.sub(r"`\1`", _DOUBLE_BACKQUOTES.sub(r"`\1`", line)))
        i += 1
    return "\n".join(out)


if griffe is not None:

    class RestExamples(griffe.Extension):
        """Rewrite docstrings as they are loaded (before mkdocstrings parses them)."""

        def on_object(self, *, obj: Any, **kwargs: Any) -> None:
            if obj.docstring is not None:
                obj.docstring.value = rest_to_markdown(obj.docstring.value)
