"""``cifarlab explore RUN``: a local web app to explore one's own network with one's own photos."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

from .args import bounded_float, bounded_int
from .visualize import attribution_methods


def register(sub) -> None:
    from ..explain.methods import METHODS
    from ..explore.core import EXAMPLE_IMAGES, NEIGHBOURS, TOP_K

    p = sub.add_parser("explore", help="a local web app: drop a photo, see what your network does with it",
                       description="Serve a page on this computer where you drop or choose a photo (or pick a "
                                   "test image) and see the picture as the net sees it, its calibrated top "
                                   "classes, the 'unlike any class I know' verdict, attribution maps, every "
                                   "layer's activation maps (click a channel for its maximum stimulus and the "
                                   "training images that excite it most) and the nearest training images. "
                                   "Nothing is fetched from the network; no telemetry.")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder (or any checkpoint predict takes)")
    p.add_argument("--port", type=bounded_int(0, 65535), default=8765, help="port (default: 8765; 0: any free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this computer only; another address needs "
                        "--allow-remote)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other computers can reach (the explorer has no login: anyone who reaches "
                        "it can use it and see the run's training images)")
    p.add_argument("--no-browser", action="store_true", help="do not open the page in a web browser")
    p.add_argument("--data-dir", help="where the run's dataset is (default: as the run recorded it, $CIFARLAB_DATA, "
                                      "the cache)")
    p.add_argument("--no-ood", action="store_true",
                   help="skip the run's feature bank: no 'unlike any class' verdict and no nearest training images "
                        "(the bank is built once per run and cached in RUN/ood/)")
    p.add_argument("--methods", type=attribution_methods, default=None, metavar="M1,M2",
                   help="attribution methods, comma-separated, from: " + ", ".join(METHODS)
                        + " (default: integrated_gradients,grad_cam)")
    p.add_argument("--top-k", type=bounded_int(1, 1000), default=TOP_K, help=f"classes shown (default: {TOP_K})")
    p.add_argument("--neighbours", type=bounded_int(1, 50), default=NEIGHBOURS,
                   help=f"nearest training images shown (default: {NEIGHBOURS})")
    p.add_argument("--example-images", type=bounded_int(0, 10_000_000), default=EXAMPLE_IMAGES,
                   help=f"search the first N training images for each channel's most exciting ones (default: "
                        f"{EXAMPLE_IMAGES:,}; 0: all)")
    p.add_argument("--max-upload-mb", type=bounded_float(0.1, 256), default=20,
                   help="largest picture accepted, in MB (default: 20)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..explore.app import create_app
    from ..explore.core import ExploreSettings
    from ..explore.server import bind, check_host, server_for, url_of

    remote = check_host(args.host, args.allow_remote)  # before anything slow: a refusal is immediate
    if remote:
        print(f"warning: serving on {args.host}: anyone who can reach this computer can use the explorer and see "
              f"the run's training images (there is no login)", file=sys.stderr)
    sock = bind(args.host, args.port)  # the port is taken (or refused) before the run is loaded
    settings = ExploreSettings(**{k: v for k, v in (("methods", args.methods), ("top_k", args.top_k),
                                                    ("neighbours", args.neighbours)) if v is not None},
                               example_images=args.example_images or None, ood=not args.no_ood)
    log = lambda *a, **k: print(*a, **dict(k, file=sys.stderr))  # noqa: E731 - progress goes to stderr
    try:
        app = create_app(args.run, data_dir=args.data_dir, settings=settings,
                         max_upload_bytes=int(args.max_upload_mb * 1024 ** 2),
                         hosts=None if remote else _names(args.host), log=log)
    except BaseException:
        sock.close()
        raise
    url = url_of(sock)
    print(f"cifarlab explore: {args.run} at {url}  (Ctrl-C to stop)", flush=True)
    if not args.no_browser:
        threading.Timer(0.5, _open_browser, (url,)).start()
    try:
        server_for(app).run(sockets=[sock])  # until Ctrl-C (uvicorn finishes the answers in flight first)
    except KeyboardInterrupt:
        pass
    print("cifarlab explore: stopped", file=sys.stderr)
    return 0


def _names(host: str) -> tuple[str, ...]:
    from ..explore.app import LOOPBACK_NAMES

    return (*LOOPBACK_NAMES, host.strip("[]").lower())


def _open_browser(url: str) -> None:
    import webbrowser

    try:
        webbrowser.open(url)
    except Exception as e:  # noqa: BLE001 - no browser is not an error: the URL is printed
        print(f"note: could not open a browser ({e}); open {url}", file=sys.stderr)
