"""A TCP proxy that can stall: bytes pass through to a target port until `stall()`; from then on
every connection, new or already open, is held for `delay_s` when it next sends, then dropped
with a reset. `resume()` passes bytes again. Threads, so it runs beside any event loop."""

from __future__ import annotations

import socket
import struct
import threading
import time

from server.launcher import free_port


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dropped connection looks to the client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class StallProxy:
    def __init__(self, target_port: int, delay_s: float):
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = free_port()
        self.stalled = False
        self.dropped = 0  # connections held and dropped
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall(self) -> None:
        self.stalled = True

    def resume(self) -> None:
        self.stalled = False

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            _reset(client)
            return
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        """Copy src -> dst; a client sending while stalled is held, then both ends are reset."""
        try:
            while data := src.recv(65536):
                if from_client and self.stalled:
                    time.sleep(self.delay_s)
                    with self._lock:
                        self.dropped += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        _reset(src)
        _reset(dst)
