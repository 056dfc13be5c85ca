"""Raw TCP echo for the end-to-end tests.

    tcp_echo.py server HOST PORT          echo every byte back, per connection
    tcp_echo.py banner HOST PORT MARKER   the same, but first send `HELLO MARKER\\n` on accept
                                          (a server-first protocol, like SMTP or MySQL)
    tcp_echo.py client HOST PORT BYTES [--marker M] [--banner]

The servers print `READY` once listening (HOST `::` listens on IPv4 and IPv6 at once). The
client sends BYTES bytes (starting with M if given, the rest random) in chunks while reading
the echo back, compares, and prints one JSON line: {"ok", "bytes", "sha256", "banner"}; with
--banner it first reads the server's banner line (and sends nothing until it has it). On a
mismatch it prints {"ok": false, "error": ...} and exits 1.
"""

import hashlib
import json
import os
import socket
import sys
import threading

CHUNK = 64 * 1024


def listen(host, port):
    if host == "::":
        return socket.create_server((host, port), family=socket.AF_INET6, dualstack_ipv6=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def serve(host, port, banner):
    server = listen(host, port)
    print("READY", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn, banner), daemon=True).start()


def echo(conn, banner):
    with conn:
        try:
            if banner is not None:
                conn.sendall(b"HELLO " + banner.encode() + b"\n")
            while data := conn.recv(CHUNK):
                conn.sendall(data)
        except OSError as e:
            sys.stderr.write(f"tcp_echo: {e}\n")


def recv_line(sock):
    line = bytearray()
    while not line.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            break
        line += b
    return line.decode(errors="replace").rstrip("\n")


def client(host, port, size, marker, want_banner):
    data = (marker.encode() + os.urandom(size))[:size] if marker else os.urandom(size)
    sock = socket.create_connection((host, port), timeout=30)
    banner = recv_line(sock) if want_banner else None

    def send():
        for i in range(0, len(data), CHUNK):
            sock.sendall(data[i : i + CHUNK])

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got = bytearray()
    while len(got) < size:
        b = sock.recv(CHUNK)
        if not b:
            break
        got += b
    sender.join()
    sock.close()
    result = {
        "ok": bytes(got) == data,
        "bytes": len(got),
        "sha256": hashlib.sha256(got).hexdigest(),
        "banner": banner,
    }
    if not result["ok"]:
        result["error"] = f"sent {size} bytes, got {len(got)} back" + (
            "" if len(got) != size else " that differ"
        )
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 1)


def main():
    args = sys.argv[1:]
    mode = args[0]
    if mode == "server":
        serve(args[1], int(args[2]), None)
    elif mode == "banner":
        serve(args[1], int(args[2]), args[3])
    elif mode == "client":
        rest = args[4:]
        marker = rest[rest.index("--marker") + 1] if "--marker" in rest else None
        client(args[1], int(args[2]), int(args[3]), marker, "--banner" in rest)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
