"""A TCP fault-injection proxy on loopback, built on gevent.

``FaultProxy(target_host, target_port)`` listens on ``127.0.0.1:<free port>``
and forwards every accepted connection to the target, both ways, inside the
current process using gevent greenlets and gevent sockets (it does not need
monkey-patching itself, but clients in the same thread must be cooperative,
e.g. psycopg imported after ``gevent.monkey.patch_all()``).

Faults, each effective at once for existing and new connections:

* :meth:`FaultProxy.set_latency` -- every forwarded chunk is delivered
  ``seconds`` after it was read, in each direction, order preserved.
* :meth:`FaultProxy.blackhole` -- nothing is forwarded either way; sockets stay
  open and unread/held data is delivered in order after :meth:`heal` (like a
  network partition that heals with TCP retransmits). New connections are
  accepted but not connected upstream until healed.
* :meth:`FaultProxy.reset_all` -- every current connection is closed with an
  RST towards the client (``SO_LINGER`` 0) and closed towards the target.
* :meth:`FaultProxy.refuse` -- the listening socket is closed, so new
  connections fail at once with ECONNREFUSED; ``refuse(False)`` re-listens on
  the same port.
* :meth:`FaultProxy.heal` -- latency 0, no blackhole, accepting again.

Per connection there are four greenlets (reader + writer per direction, joined
by a queue so latency does not reorder data) plus one supervising greenlet;
all of them belong to one :class:`gevent.pool.Group` and are killed on
:meth:`FaultProxy.stop`. Nothing polls: greenlets block on sockets, queues or
an :class:`gevent.event.Event`.
"""

from __future__ import annotations

import contextlib
import errno
import struct
import time
from types import TracebackType
from typing import Final

import gevent
import gevent.event
import gevent.pool
import gevent.queue
from gevent import socket as gsocket

__all__ = ["FaultProxy"]

_CHUNK: Final = 65536
# Chunks buffered per direction (latency/blackhole) before back-pressure.
_QUEUE_CHUNKS: Final = 256
_UPSTREAM_CONNECT_TIMEOUT: Final = 5.0
_EOF: Final = object()
_LINGER_RST: Final = struct.pack("ii", 1, 0)


def _close_socket(sock: gsocket.socket | None, *, rst: bool = False) -> None:
    if sock is None:
        return
    if rst:
        with contextlib.suppress(OSError):
            sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


def _nodelay(sock: gsocket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)


class _Link:
    """One proxied client connection and the greenlets serving it."""

    __slots__ = ("client", "closed", "greenlets", "upstream")

    def __init__(self, client: gsocket.socket) -> None:
        self.client = client
        self.upstream: gsocket.socket | None = None
        self.greenlets: list[gevent.Greenlet] = []
        self.closed = False


class FaultProxy:
    """Loopback TCP proxy with injectable faults (see module docstring)."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._host = listen_host
        self._port = port
        self._latency = 0.0
        self._flowing = gevent.event.Event()  # set <=> not black-holed
        self._flowing.set()
        self._refusing = False
        self._started = False
        self._listener: gsocket.socket | None = None
        self._acceptor: gevent.Greenlet | None = None
        self._group = gevent.pool.Group()
        self._links: set[_Link] = set()
        self._total = 0

    # -- context manager / repr ----------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self._host}:{self._port} -> {self.target_host}:{self.target_port}"
            f" latency={self._latency} blackhole={self.is_blackholed}"
            f" refusing={self._refusing} open={self.connection_count}>"
        )

    # -- properties ---------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """Listening port (known after :meth:`start`)."""
        return self._port

    @property
    def latency(self) -> float:
        return self._latency

    @property
    def is_blackholed(self) -> bool:
        return not self._flowing.is_set()

    @property
    def is_refusing(self) -> bool:
        return self._refusing

    @property
    def connection_count(self) -> int:
        """Currently open proxied connections."""
        return len(self._links)

    @property
    def greenlet_count(self) -> int:
        """Greenlets currently owned by the proxy (0 after :meth:`stop`)."""
        return len(self._group)

    @property
    def total_connections(self) -> int:
        """Connections accepted since start (refused ones are not counted)."""
        return self._total

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._listen()  # binds (and so assigns) the port even when refusing
        if self._refusing:
            self._stop_listening()

    def stop(self) -> None:
        """Stop listening, close every connection, kill every greenlet."""
        if not self._started:
            return
        self._started = False
        self._stop_listening()
        for link in list(self._links):
            self._close_link(link, rst=False)
        self._group.kill(block=True)

    # -- faults -------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = float(seconds)

    def blackhole(self) -> None:
        self._flowing.clear()

    def reset_all(self) -> int:
        """RST every current connection; returns how many were reset."""
        links = list(self._links)
        for link in links:
            self._close_link(link, rst=True)
        return len(links)

    def refuse(self, refusing: bool = True) -> None:
        self._refusing = refusing
        if not self._started:
            return
        if refusing:
            self._stop_listening()
        elif self._listener is None:
            self._listen()

    def heal(self) -> None:
        self._latency = 0.0
        self._flowing.set()
        self.refuse(False)

    # -- listening ----------------------------------------------------------

    def _listen(self) -> None:
        listener = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_STREAM)
        try:
            listener.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEADDR, 1)
            listener.bind((self._host, self._port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = self._group.spawn(self._accept_loop, listener)

    def _stop_listening(self) -> None:
        acceptor, self._acceptor = self._acceptor, None
        listener, self._listener = self._listener, None
        if acceptor is not None and acceptor is not gevent.getcurrent():
            acceptor.kill(block=True)
        if listener is not None:
            # Closing resets connections still queued in the backlog, so
            # clients see an error rather than a hang.
            _close_socket(listener)

    def _accept_loop(self, listener: gsocket.socket) -> None:
        while True:
            try:
                client, _addr = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    gevent.sleep(0.05)  # transient resource shortage
                    continue
                return  # listener closed
            if self._refusing:
                _close_socket(client, rst=True)
                continue
            _nodelay(client)
            link = _Link(client)
            self._links.add(link)
            self._total += 1
            link.greenlets.append(self._group.spawn(self._serve, link))

    # -- per connection -----------------------------------------------------

    def _serve(self, link: _Link) -> None:
        failed = False
        try:
            if link.closed:
                return
            # A black-holed network does not let the SYN through either.
            self._flowing.wait()
            try:
                upstream = gsocket.create_connection(
                    (self.target_host, self.target_port), timeout=_UPSTREAM_CONNECT_TIMEOUT
                )
            except OSError:
                failed = True
                return
            upstream.settimeout(None)
            _nodelay(upstream)
            if link.closed:
                _close_socket(upstream)
                return
            link.upstream = upstream
            to_up: gevent.queue.Queue[object] = gevent.queue.Queue(_QUEUE_CHUNKS)
            to_client: gevent.queue.Queue[object] = gevent.queue.Queue(_QUEUE_CHUNKS)
            pumps = [
                self._group.spawn(self._reader, link.client, to_up),
                self._group.spawn(self._writer, to_up, upstream),
                self._group.spawn(self._reader, upstream, to_client),
                self._group.spawn(self._writer, to_client, link.client),
            ]
            link.greenlets.extend(pumps)
            # Done when all four finished (EOF both ways) or any one failed.
            for finished in gevent.iwait(pumps):
                if finished.value is not True:
                    failed = True
                    break
        finally:
            self._close_link(link, rst=failed)

    # Pumps return True on a clean EOF and False on a socket error (rather
    # than raising, which would make gevent print a traceback).

    def _reader(self, src: gsocket.socket, queue: gevent.queue.Queue[object]) -> bool:
        while True:
            self._flowing.wait()  # black-holed: leave data unread
            try:
                data = src.recv(_CHUNK)
            except OSError:
                return False
            if not data:
                queue.put(_EOF)
                return True
            queue.put((time.monotonic() + self._latency, data))

    def _writer(self, queue: gevent.queue.Queue[object], dst: gsocket.socket) -> bool:
        while True:
            item = queue.get()
            if item is _EOF:
                with contextlib.suppress(OSError):
                    dst.shutdown(gsocket.SHUT_WR)
                return True
            assert isinstance(item, tuple)
            deliver_at, data = item
            delay = deliver_at - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            self._flowing.wait()  # black-holed: hold data already read
            try:
                dst.sendall(data)
            except OSError:
                return False

    def _close_link(self, link: _Link, *, rst: bool) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        current = gevent.getcurrent()
        others = [g for g in link.greenlets if g is not current]
        if others:
            gevent.killall(others, block=True)
        _close_socket(link.client, rst=rst)
        _close_socket(link.upstream)
