"""A webhook receiver for tests: an HTTP server on 127.0.0.1 (a free port) that verifies every POST's signature
with the `standardwebhooks` package and answers from a script of status codes.

`WebhookReceiver(secret, answers=(500, 200))`: the i-th POST gets answers[i] (200 once the script is used up);
an answer may be `HOLD`: the request waits until `release()` (a receiver that is slow while a dispatcher is killed).
`.url(path)`, `.deliveries` (each: path, headers, body, verified payload or None), `.wait_for(n, timeout)`.
"""
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

HOLD = "hold"


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict
    body: str
    payload: dict | None   # the verified JSON body; None when the signature did not verify

    @property
    def msg_id(self) -> str:
        return self.headers["webhook-id"]


class WebhookReceiver:
    def __init__(self, secret: str, answers=()):
        self.webhook, self.answers = Webhook(secret), list(answers)
        self.deliveries: list[Delivery] = []
        self._lock, self._released = threading.Lock(), threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def release(self) -> None:
        self._released.set()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.deliveries)} webhook deliveries after {timeout}s, expected {count}")
            time.sleep(0.02)
        return list(self.deliveries)

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    def _record(self, path: str, headers: dict, body: str) -> str | int:
        try:
            payload = self.webhook.verify(body, headers)
        except WebhookVerificationError:
            payload = None
        with self._lock:
            index = len(self.deliveries)
            self.deliveries.append(Delivery(path, headers, body, payload))
            return self.answers[index] if index < len(self.answers) else 200

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
                answer = receiver._record(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if answer == HOLD:
                    receiver._released.wait(60)
                    answer = 200
                self.send_response(answer)
                if 300 <= answer < 400:
                    self.send_header("location", receiver.url("/elsewhere"))
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):   # quiet test output
                pass

        return Handler
