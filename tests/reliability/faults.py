"""Fault injection for the reliability tests: a TCP proxy that can be cut and restored, and process signals."""
import os
import signal
import socket
import threading
import time

LOCALHOST = "127.0.0.1"


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to a target address. `cut()` resets every open connection and refuses new ones
    (the service looks unreachable); `restore()` accepts again on the same port."""

    def __init__(self, target_port: int, port: int = 0):
        self.target_port = target_port
        self._lock = threading.Lock()
        self._switch = threading.Lock()   # cut() and restore() one at a time (a timer may restore too)
        self._connections: set[socket.socket] = set()
        self._listener = self._listen(port)
        self.cut_now = False
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{LOCALHOST}:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOCALHOST, port))
        listener.listen(64)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:   # the listener was closed by cut()
                return
            try:
                upstream = socket.create_connection((LOCALHOST, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source)
            self._drop(sink)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        with self._switch:
            self.cut_now = True
            # shutdown() first: a bare close() does not wake the accept() blocked in another thread, and the
            # socket would go on listening.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            with self._lock:
                open_now = list(self._connections)
            for sock in open_now:
                self._drop(sock)

    def restore(self) -> None:
        with self._switch:
            if self.cut_now:
                self._listener = self._listen(self.port)
                self.cut_now = False

    def cut_for(self, seconds: float) -> None:
        """Cut now and restore after `seconds`, on a background thread."""
        self.cut()
        threading.Timer(seconds, self.restore).start()

    def close(self) -> None:
        self.cut()


def kill(process, sig=signal.SIGKILL) -> None:
    """Send `sig` to the process (and not to anything else)."""
    os.kill(process.pid, sig)


def wait_exit(process, timeout: float) -> int | None:
    """The process' exit code, or None if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return process.returncode
        time.sleep(0.05)
    return None
