"""A minimal receiver of inpaint-fleet webhooks (standard library + `pip install standardwebhooks`).

    INPAINT_WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 9000

Verifies each POST's signature, answers 204 quickly (do slow work elsewhere: past INPAINT_WEBHOOK_TIMEOUT_S the
POST counts as failed and comes again), skips a `webhook-id` it has already handled (deliveries are at least
once), and prints one line per event. A bad signature gets 400.
"""
import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

webhook = Webhook(os.environ["INPAINT_WEBHOOK_SECRET"])
seen_ids = set()   # a real service keeps these in its database, with the work the event caused


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            event = webhook.verify(body, dict(self.headers))   # the raw bytes, exactly as received
        except WebhookVerificationError as error:
            self.send_response(400)
            self.end_headers()
            print(json.dumps({"refused": str(error)}), flush=True)
            return
        self.send_response(204)
        self.end_headers()
        if self.headers["webhook-id"] in seen_ids:
            return
        seen_ids.add(self.headers["webhook-id"])
        job = event["data"]
        print(json.dumps({"type": event["type"], "job": job["id"], "state": job["state"]}), flush=True)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    options = parser.parse_args()
    ThreadingHTTPServer((options.host, options.port), Handler).serve_forever()
