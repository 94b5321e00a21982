"""A TCP proxy on 127.0.0.1 in front of the moto server, to cut the S3 endpoint on demand.

`cut()` resets every open connection and, until `restore()`, answers each new one with a reset
(counted in `rejected`, so a test can show its clients really hit the outage); `stop()` closes the
listening socket instead, so new connections are refused, as when the endpoint's process is down.
"""

from __future__ import annotations

import socket
import struct
import threading
import time


class TcpProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self.rejected = 0
        self._cut = False
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again) on the same port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.1)  # the accept loop polls, so stop() never waits on a blocked accept
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and reset the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._reset_all()

    def cut(self) -> None:
        """Reset the open connections and every new one until restore()."""
        self._cut = True
        self._reset_all()

    def restore(self) -> None:
        self._cut = False
        if self._listener is None:
            self.start()

    def outage(self, seconds: float, min_rejected: int = 0, limit_s: float = 120.0) -> threading.Thread:
        """In the background: cut, wait until `min_rejected` connections were reset (clients met the
        outage; at most limit_s), keep it cut `seconds` longer, restore."""
        def run() -> None:
            self.cut()
            give_up = time.monotonic() + limit_s
            while self.rejected < min_rejected and time.monotonic() < give_up:
                time.sleep(0.05)
            time.sleep(seconds)
            self.restore()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def _reset_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            _reset(c)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut:
                self.rejected += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with self._lock:
                self._conns.discard(s)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees "connection reset", not a clean end of stream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
