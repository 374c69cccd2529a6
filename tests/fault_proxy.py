"""A real HTTP endpoint in front of a real server, that misbehaves on purpose (run as its own process).

    python tests/fault_proxy.py --port P --upstream http://127.0.0.1:Q [--fail-first N --status 429] [--delay S]

Forwards every request to the upstream unchanged, except: the first N POSTs are answered with `--status` (429,
500...) and no body from upstream, and every POST waits `--delay` seconds first (to trigger client timeouts).
Killing the process is an endpoint dying mid-run.
"""

import argparse
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--status", type=int, default=500)
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    up = urlparse(args.upstream)
    lock, seen = threading.Lock(), [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def forward(self, body: bytes | None) -> None:
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=600)
            conn.request(self.command, self.path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            self.reply(r.status, data)

        def reply(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.forward(None)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                seen[0] += 1
                fail = seen[0] <= args.fail_first
            if args.delay:
                time.sleep(args.delay)
            if fail:
                self.reply(args.status, b'{"error": "injected by fault_proxy"}')
            else:
                self.forward(body)

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
