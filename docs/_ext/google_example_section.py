"""Griffe extension for the API pages: read a Google-style ``Example:`` section as ``Examples:``.

The Google style guide (and Sphinx's napoleon) accept both titles; griffe knows only
``Examples:`` and would render ``Example:`` as an admonition of Markdown, ``>>>`` lines as
quotes. Every docstring here says ``Example:``, so the site renames the title when it reads them.
"""

import re

import griffe

_EXAMPLE_TITLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class GoogleExampleSection(griffe.Extension):
    """Rename each docstring's ``Example:`` section title to ``Examples:``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)
