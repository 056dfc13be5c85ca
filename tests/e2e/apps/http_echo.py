"""HTTP/1.1 echo server for the end-to-end tests.

    http_echo.py HOST PORT

Answers any method with one JSON object: method, path, target (the raw request target),
query, headers (lower-cased name -> every value, in order), client (the peer address the
server saw), body_len and body_sha256 of the request body (Content-Length or chunked).
`?sleep_ms=N` delays the answer by N ms. HOST `::` listens on IPv4 and IPv6 at once.
Prints `READY` once listening.
"""

import hashlib
import json
import socket
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size_line = self.rfile.readline()
                if not size_line:
                    raise ValueError("connection closed inside a chunked body")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # Trailer section: header lines up to an empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()  # CRLF after the chunk data
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self):
        body = self.read_body()
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if "sleep_ms" in query:
            time.sleep(int(query["sleep_ms"][0]) / 1000)
        headers = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        out = json.dumps(
            {
                "method": self.command,
                "path": url.path,
                "target": self.path,
                "query": query,
                "headers": headers,
                "client": list(self.client_address[:2]),
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = answer

    def log_message(self, fmt, *args):
        sys.stderr.write("http_echo: " + (fmt % args) + "\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host, port):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            # `::` serves IPv4 too.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    server = Server(host, port)
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
