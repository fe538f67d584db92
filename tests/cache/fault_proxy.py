"""A loopback TCP proxy that injects network faults in front of a real server.

Test support code: the S3 client under test talks to the proxy
(``endpoint_url=proxy.url``), the proxy forwards to the moto S3 server, and a
test switches the proxy's mode while the client works:

``"pass"``
    forward every byte both ways.
``"delay"``
    forward, but hold each new connection and each new HTTP request for
    ``delay_s`` seconds first (a slow endpoint; the client's connect succeeds
    at once, so the wait counts against its read timeout).
``"reset"``
    accept, then reset the connection (``RST``) before any byte is answered.
``"drop"``
    accept, read the request, close the connection without an answer (``FIN``).
``"blackhole"``
    accept and read forever, never answer (the client's read timeout decides).

Switching away from ``"pass"``/``"delay"`` also breaks the connections that
are open at that moment (as a network failure would): clients pool their
connections, and a fault must reach those too. ``reset_on`` adds a targeted
fault: a connection whose client sends a request line matching the pattern
is reset before the request reaches the server (e.g. only the PUT of a
manifest), whatever the mode.

The proxy counts accepted connections and forwarded requests so a test can
check how often a client retried.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

MODES = ("pass", "delay", "reset", "drop", "blackhole")
_REQUEST_START = re.compile(rb"^(GET|PUT|POST|HEAD|DELETE|PATCH|OPTIONS) ")


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of ``upstream`` (host, port).

    Example:
        >>> with FaultProxy(("127.0.0.1", 5000)) as proxy:  # doctest: +SKIP
        ...     proxy.set_mode("blackhole")
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.delay_s = 0.0
        self.reset_on: re.Pattern[bytes] | None = None
        self.connections = 0  # accepted since the last reset_counters()
        self.requests = 0  # HTTP requests forwarded upstream
        self.reset_requests = 0  # requests killed by ``reset_on``
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ control
    def set_mode(self, mode: str, delay_s: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        with self._lock:
            self.mode, self.delay_s = mode, float(delay_s)
            doomed = list(self._open) if mode not in ("pass", "delay") else []
        for sock in doomed:
            _reset(sock)

    def reset_counters(self) -> None:
        with self._lock:
            self.connections = self.requests = self.reset_requests = 0

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            doomed = list(self._open)
        for sock in doomed:
            _reset(sock)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------- internals
    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                mode, delay_s = self.mode, self.delay_s
            threading.Thread(target=self._serve, args=(client, mode, delay_s), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str, delay_s: float) -> None:
        self._track(client)
        try:
            if mode == "reset":
                _reset(client)
                return
            if mode == "drop":
                client.settimeout(2.0)
                with contextlib.suppress(OSError):
                    client.recv(65536)
                client.close()
                return
            if mode == "blackhole":
                _swallow(client, self._stopped)
                return
            if mode == "delay":
                time.sleep(delay_s)
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                return
            self._track(upstream)
            self._pump(client, upstream)
        finally:
            self._untrack(client)
            with contextlib.suppress(OSError):
                client.close()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Forward both ways until either side closes (or a fault breaks them)."""
        sockets = [client, upstream]
        try:
            while not self._stopped.is_set():
                try:
                    readable, _, broken = select.select(sockets, [], sockets, 0.2)
                except (OSError, ValueError):  # a fault closed a socket under us
                    return
                if broken:
                    return
                for sock in readable:
                    try:
                        data = sock.recv(262144)
                    except OSError:
                        return
                    if not data:
                        return
                    if sock is client:
                        if not self._client_chunk(client, data):
                            return
                        target = upstream
                    else:
                        target = client
                    try:
                        target.sendall(data)
                    except OSError:
                        return
        finally:
            self._untrack(upstream)
            with contextlib.suppress(OSError):
                upstream.close()

    def _client_chunk(self, client: socket.socket, data: bytes) -> bool:
        """Apply per-request faults to a chunk from the client; False: connection killed."""
        if not _REQUEST_START.match(data):
            return True
        with self._lock:
            mode, delay_s, pattern = self.mode, self.delay_s, self.reset_on
        first_line = data.split(b"\r\n", 1)[0]
        if pattern is not None and pattern.search(first_line):
            with self._lock:
                self.reset_requests += 1
            _reset(client)
            return False
        if mode == "delay":
            time.sleep(delay_s)
        elif mode != "pass":
            _reset(client)
            return False
        with self._lock:
            self.requests += 1
        return True

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER with a zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _swallow(sock: socket.socket, stopped: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stopped.is_set():
        try:
            if not sock.recv(262144):
                return
        except TimeoutError:
            continue
        except OSError:
            return


@contextlib.contextmanager
def fault_proxy(endpoint_url: str) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``http://host:port``, closed afterwards."""
    host, _, port = endpoint_url.removeprefix("http://").rstrip("/").partition(":")
    proxy = FaultProxy((host, int(port)))
    try:
        yield proxy
    finally:
        proxy.close()
