"""Griffe extension for the docs build: read a Google-style ``Example:`` section as ``Examples:``.

The library's docstrings head their doctests ``Example:`` (the singular Napoleon accepts). Griffe knows only
``Examples:`` and would render the doctest as Markdown prose, where an output such as ``[0.05, 0.0]`` reads as a
cross-reference; with this extension the doctests render as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSection(griffe.Extension):
    """Rename ``Example:`` section headings to ``Examples:`` before the docstrings are parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the heading in the docstring of every object."""
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
