#!/usr/bin/env python3
"""A stock grpcio client of the SPIFFE Workload API with no generated code: raw method paths
and hand-encoded requests, so only the wire contract is checked. It dials the socket as
grpc-core does by default (the socket path as :authority).

Usage: workload_api_raw.py SOCKET RPC [--no-header]
Prints the status code name (OK, INVALID_ARGUMENT, ...) and, for OK, the size of the first
response message."""
import sys

import grpc

sock, rpc = sys.argv[1], sys.argv[2]
header = "--no-header" not in sys.argv[3:]
# (server streaming?, request bytes): JWTSVIDRequest{audience: "db"} is field 1, length 2;
# ValidateJWTSVIDRequest{audience: "db", svid: "a.b"} adds field 2.
REQUESTS = {
    "FetchX509SVID": (True, b""),
    "FetchX509Bundles": (True, b""),
    "FetchJWTBundles": (True, b""),
    "FetchJWTSVID": (False, b"\x0a\x02db"),
    "ValidateJWTSVID": (False, b"\x0a\x02db\x12\x03a.b"),
}
stream, body = REQUESTS.get(rpc, (False, b""))
raw = lambda b: b
metadata = [("workload.spiffe.io", "true")] if header else []
channel = grpc.insecure_channel("unix:" + sock)
path = "/SpiffeWorkloadAPI/" + rpc
try:
    if stream:
        call = channel.unary_stream(path, request_serializer=raw, response_deserializer=raw)
        first = next(iter(call(body, metadata=metadata, timeout=20)))
    else:
        call = channel.unary_unary(path, request_serializer=raw, response_deserializer=raw)
        first = call(body, metadata=metadata, timeout=20)
    print("OK", len(first))
except grpc.RpcError as e:
    print(e.code().name, e.details())
