"""gRPC echo (grpcio, generic handlers, raw bytes: no generated code) for the end-to-end tests.

    grpc_echo.py server HOST PORT     prints READY once listening (HOST `::`: IPv4 and IPv6)
    grpc_echo.py client TARGET N [--marker M]     e.g. TARGET 10.1.2.3:50051 or [fd00::2]:50051

Service meshid.test.Echo:
  Unary          echoes the request; `metadata?` answers the invocation metadata as JSON
                 ({"metadata": {name: [values]}, "peer": ...}); `sleep:S` answers after S
                 seconds; `fail:CODE` ends with status CODE, details `requested CODE` and the
                 trailing metadata x-echo-fail: CODE.
  ServerStream   request `N`: N replies `0` .. `N-1`.
  ClientStream   answers `COUNT:` followed by the messages concatenated.
  Chat           echoes each message as it arrives; trailing metadata x-echo-count: COUNT.

The client runs every method against TARGET over an insecure channel, checks each reply, and
prints one JSON line: {"ok": true, "target", "checks", "metadata" (what the server saw),
"peer", "chat_trailer", "deadline_elapsed_s"}; the Unary and Chat messages contain M if
given. On a mismatch it prints {"ok": false, "error": ...} and exits 1.

Proxies: grpc.enable_http_proxy is left at its default, so gRPC core takes a proxy from
grpc_proxy, https_proxy or http_proxy (lower-case only, in that order; HTTP_PROXY is ignored)
and tunnels with HTTP CONNECT to TARGET as written (a name is not resolved first), for every
target including loopback. no_grpc_proxy / no_proxy (lower-case) exempt exact hosts and CIDR
ranges (10.0.0.0/8); `*` is not a wildcard there.
"""

import json
import os
import queue
import sys
import time
from concurrent import futures

import grpc

SERVICE = "meshid.test.Echo"


def unary(request, context):
    text = request[:64].decode(errors="replace")
    if text == "metadata?":
        metadata = {}
        for key, value in context.invocation_metadata():
            metadata.setdefault(key, []).append(value if isinstance(value, str) else value.hex())
        return json.dumps({"metadata": metadata, "peer": context.peer()}).encode()
    if text.startswith("sleep:"):
        time.sleep(float(text[6:]))
        return request
    if text.startswith("fail:"):
        code = getattr(grpc.StatusCode, text[5:])
        context.set_trailing_metadata((("x-echo-fail", code.name),))
        context.abort(code, f"requested {code.name}")
    return request


def server_stream(request, context):
    for i in range(int(request)):
        yield str(i).encode()


def client_stream(request_iterator, context):
    messages = list(request_iterator)
    return str(len(messages)).encode() + b":" + b"".join(messages)


def chat(request_iterator, context):
    count = 0
    for message in request_iterator:
        count += 1
        yield message
    context.set_trailing_metadata((("x-echo-count", str(count)),))


def serve(host, port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(bind) == 0:
        sys.exit(f"grpc_echo: cannot listen on {bind}")
    server.start()
    print("READY", flush=True)
    server.wait_for_termination()


class Mismatch(Exception):
    pass


def expect(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got[:200]!r}, want {want[:200]!r}")


def expect_error(what, call, code, details=None):
    try:
        call()
    except grpc.RpcError as e:
        expect(f"{what} status", e.code(), code)
        if details is not None:
            expect(f"{what} details", e.details(), details)
        return e
    raise Mismatch(f"{what}: succeeded, want {code}")


def client(target, n, marker):
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 16 << 20)])
    try:
        grpc.channel_ready_future(channel).result(timeout=15)
    except grpc.FutureTimeoutError:
        raise Mismatch(f"channel to {target} not ready after 15 s") from None
    call = lambda kind, name: getattr(channel, kind)(f"/{SERVICE}/{name}")  # noqa: E731
    unary_call = call("unary_unary", "Unary")
    checks = []

    hello = f"hello {marker}".encode() if marker else b"hello"
    expect("Unary", unary_call(hello, timeout=10), hello)
    big = os.urandom(1 << 20)
    expect("Unary 1 MiB", unary_call(big, timeout=10), big)
    checks.append("unary")

    seen = json.loads(
        unary_call(b"metadata?", metadata=(("x-test-client", "grpc_echo"),), timeout=10)
    )
    expect("metadata sent by the client", seen["metadata"].get("x-test-client"), ["grpc_echo"])
    checks.append("metadata")

    replies = list(call("unary_stream", "ServerStream")(str(n).encode(), timeout=10))
    expect("ServerStream", replies, [str(i).encode() for i in range(n)])
    checks.append("server_stream")

    messages = [f"m{i};".encode() for i in range(n)]
    reply = call("stream_unary", "ClientStream")(iter(messages), timeout=10)
    expect("ClientStream", reply, f"{n}:".encode() + b"".join(messages))
    checks.append("client_stream")

    # Bidirectional and live: each message is sent only after the previous echo arrived.
    outbox = queue.Queue()
    chat_call = call("stream_stream", "Chat")(iter(outbox.get, None), timeout=10)
    for i in range(n):
        message = f"chat {i} {marker or ''}".encode()
        outbox.put(message)
        expect(f"Chat echo {i}", next(chat_call), message)
    outbox.put(None)
    expect("Chat end", list(chat_call), [])
    trailer = dict(chat_call.trailing_metadata() or ()).get("x-echo-count")
    expect("Chat trailing x-echo-count", trailer, str(n))
    expect("Chat status", chat_call.code(), grpc.StatusCode.OK)
    checks.append("chat")

    start = time.monotonic()
    expect_error(
        "Unary sleep:2 with a 0.5 s deadline",
        lambda: unary_call(b"sleep:2", timeout=0.5),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    elapsed = time.monotonic() - start
    if elapsed > 1.5:
        raise Mismatch(f"deadline: the call took {elapsed:.2f} s")
    checks.append("deadline")

    error = expect_error(
        "Unary fail:NOT_FOUND",
        lambda: unary_call(b"fail:NOT_FOUND", timeout=10),
        grpc.StatusCode.NOT_FOUND,
        "requested NOT_FOUND",
    )
    expect("fail trailing x-echo-fail", dict(error.trailing_metadata() or ()).get("x-echo-fail"), "NOT_FOUND")
    checks.append("status")

    channel.close()
    return {
        "ok": True,
        "target": target,
        "checks": checks,
        "metadata": seen["metadata"],
        "peer": seen["peer"],
        "chat_trailer": trailer,
        "deadline_elapsed_s": round(elapsed, 3),
    }


def main():
    mode = sys.argv[1]
    if mode == "server":
        serve(sys.argv[2], int(sys.argv[3]))
    elif mode == "client":
        target, rest = sys.argv[2], sys.argv[4:]
        marker = rest[rest.index("--marker") + 1] if "--marker" in rest else None
        try:
            result = client(target, int(sys.argv[3]), marker)
        except (Mismatch, grpc.RpcError) as e:
            reason = f"{type(e).__name__}: {e}"
            print(json.dumps({"ok": False, "target": target, "error": reason}), flush=True)
            sys.stderr.write(f"grpc_echo client: {reason}\n")
            sys.exit(1)
        print(json.dumps(result), flush=True)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
