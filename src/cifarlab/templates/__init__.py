"""The HTML templates of ``report.html`` and ``cifarlab compare --html`` (Jinja2, package data).

Every template is rendered with autoescape on: a class name, a file name, a recipe value or anything
else read from a file is text, never markup. Data for the page's scripts goes through Jinja2's
``tojson`` filter (``<``, ``>``, ``&`` and ``'`` written as ``\\u`` escapes), so it cannot close the
``<script>`` element it sits in.
"""
from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

import jinja2
from markupsafe import Markup


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    # StrictUndefined: a misspelt name in a template is an error in the tests, not a silently empty cell.
    return jinja2.Environment(loader=jinja2.PackageLoader("cifarlab", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(name: str, **context) -> str:
    return environment().get_template(name).render(**context)


def inline_script(name: str) -> tuple[Markup, str]:
    """A script shipped with the package, as markup for a ``<script>`` element, and its CSP source
    (``'sha256-...'``): the page's Content-Security-Policy runs this script and no other, so even an
    injected ``<script>`` or ``onerror=`` would not run."""
    text = environment().loader.get_source(environment(), name)[0]
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return Markup(text), f"'sha256-{digest}'"
