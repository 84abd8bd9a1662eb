"""``cifarlab explore RUN``: a local web app to explore one's own network with one's own photos.

* :mod:`.core`: :class:`Explorer`, the run loaded once and the answers (a picture explained, a channel's
  stimulus and top training images), no web.
* :mod:`.render`: tensors -> PNG data: URIs, attribution overlays, activation bytes.
* :mod:`.app`: the Starlette app (:func:`create_app`): the page, the upload limit, the Host check and the
  security headers.
* :mod:`.server`: loopback-only binding and uvicorn (:func:`running` serves in a thread).

``templates/`` (Jinja2, autoescaped) and ``static/`` (plain JS and CSS) are the page; nothing on it comes
from another host.
"""
from .core import ExploreError, Explorer, ExploreSettings

__all__ = ["Explorer", "ExploreSettings", "ExploreError", "create_app"]


def create_app(*args, **kwargs):
    """:func:`cifarlab.explore.app.create_app` (Starlette is imported only when an app is made)."""
    from .app import create_app as make

    return make(*args, **kwargs)
