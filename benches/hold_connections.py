"""Open N keep-alive connections to a sidecar and hold them, for the memory figure.

usage: hold_connections.py plain HOST:PORT N
       hold_connections.py mtls  HOST:PORT N CERT KEY

Each connection sends one request (GET /healthz, Host: b) and reads the answer, then stays open.
Prints "HOLDING n" when all are open, then waits for stdin to close.
"""
import socket
import ssl
import sys


def main():
    kind, addr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    host, port = addr.rsplit(":", 1)
    ctx = None
    if kind == "mtls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # this client measures the server; the server checks us
        ctx.load_cert_chain(sys.argv[4], sys.argv[5])
        ctx.set_alpn_protocols(["http/1.1"])
    held = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        if ctx:
            s = ctx.wrap_socket(s)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: b\r\n\r\n")
        s.recv(4096)
        held.append(s)
    print(f"HOLDING {len(held)}", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
