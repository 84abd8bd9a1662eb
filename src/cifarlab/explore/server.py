"""Serving the explorer with uvicorn: which addresses are allowed, binding, and a server in a thread.

The explorer has no login; bound to a loopback address only this computer reaches it. :func:`check_host`
refuses any other address unless the caller allows remote use explicitly (the CLI's ``--allow-remote``,
with a warning). :func:`bind` takes the port (0: any free one) before the server starts, so the URL
printed is the one that answers.
"""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time

from .core import ExploreError


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_host(host: str, allow_remote: bool) -> bool:
    """Whether the server is reachable from other computers; refuses that unless ``allow_remote``."""
    if is_loopback(host):
        return False
    if not allow_remote:
        raise ExploreError(f"--host {host} is not a loopback address, so other computers could use the explorer "
                           f"(it has no login); give --allow-remote to do that anyway, or keep --host 127.0.0.1")
    return True


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); a clear error when the port is taken or the host unknown."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        raise ExploreError(f"--host {host}: not an address of this computer ({e.strerror or e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as e:
        sock.close()
        hint = "choose another with --port, or --port 0 for any free one" if port else "check --host"
        raise ExploreError(f"cannot listen on {host} port {port} ({e.strerror or e}); {hint}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def server_for(app, log_level: str = "warning"):
    import uvicorn

    # lifespan "on": the app's shutdown stops the explorer's background work before the interpreter exits
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on"))


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0):
    """Serve ``app`` in a background thread (for tests and notebooks); yields the URL; stops on exit."""
    sock = bind(host, port)
    server = server_for(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        sock.close()
        raise ExploreError("the explorer's server did not start")
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
