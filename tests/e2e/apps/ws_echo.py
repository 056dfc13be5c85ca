"""WebSocket echo (the `websockets` library) for the end-to-end tests.

    ws_echo.py server HOST PORT    prints READY once listening (HOST `::`: IPv4 and IPv6)
    ws_echo.py client URL N [--marker M]    e.g. URL ws://10.1.2.3:8765/chat

Compression (permessage-deflate) is off on both sides, so a capture sees the messages as
sent. The server echoes every message; to the text message `headers?` it answers the handshake
request as JSON: {"path", "headers": {lower-cased name: [values]}}. The client sends N text
messages (each containing M if given) and one binary message of 1 MiB, checks every echo, fetches the headers, and prints
one JSON line: {"ok": true, "url", "proxy", "messages", "binary_bytes", "path", "headers"}.
`proxy` is the proxy it went through: websockets (>= 15) uses one by default from the
environment (ws_proxy, https_proxy, http_proxy, in that order of preference for ws:// URLs;
no_proxy is honoured), with HTTP CONNECT for http:// proxies. On a mismatch it prints
{"ok": false, "error": ...} and exits 1.
"""

import asyncio
import json
import os
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

MAX_SIZE = 16 << 20


async def echo(ws):
    async for message in ws:
        if message == "headers?":
            headers = {}
            for name, value in ws.request.headers.raw_items():
                headers.setdefault(name.lower(), []).append(value)
            await ws.send(json.dumps({"path": ws.request.path, "headers": headers}))
        else:
            await ws.send(message)


async def server(host, port):
    async with serve(echo, host, port, max_size=MAX_SIZE, compression=None):
        print("READY", flush=True)
        await asyncio.Future()


class Mismatch(Exception):
    pass


async def client(url, n, marker):
    proxy = get_proxy(parse_uri(url))
    async with connect(url, max_size=MAX_SIZE, compression=None, open_timeout=15) as ws:
        for i in range(n):
            message = f"{marker} message {i}" if marker else f"message {i}"
            await ws.send(message)
            got = await asyncio.wait_for(ws.recv(), 10)
            if got != message:
                raise Mismatch(f"echo {i}: got {got!r}, want {message!r}")
        blob = os.urandom(1 << 20)
        await ws.send(blob)
        got = await asyncio.wait_for(ws.recv(), 10)
        if got != blob:
            raise Mismatch(f"binary echo: got {type(got).__name__} of {len(got)}, want 1 MiB of bytes")
        await ws.send("headers?")
        seen = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return {
        "ok": True,
        "url": url,
        "proxy": proxy,
        "messages": n,
        "binary_bytes": len(blob),
        "path": seen["path"],
        "headers": seen["headers"],
    }


def main():
    mode = sys.argv[1]
    if mode == "server":
        host = sys.argv[2]
        asyncio.run(server(None if host == "::" else host, int(sys.argv[3])))
    elif mode == "client":
        url, rest = sys.argv[2], sys.argv[4:]
        marker = rest[rest.index("--marker") + 1] if "--marker" in rest else None
        try:
            result = asyncio.run(client(url, int(sys.argv[3]), marker))
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            print(json.dumps({"ok": False, "url": url, "error": reason}), flush=True)
            sys.stderr.write(f"ws_echo client: {reason}\n")
            sys.exit(1)
        print(json.dumps(result), flush=True)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
