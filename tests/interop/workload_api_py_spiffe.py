#!/usr/bin/env python3
"""py-spiffe (the SPIFFE project's Python library) as an app would use it: the Workload API
found through SPIFFE_ENDPOINT_SOCKET, then the X.509-SVID, the bundles, a JWT-SVID for
audience "db" (validated locally against the JWT bundle, and by the Workload API), printed as
one JSON object for the test to compare with what rust-spiffe got."""
import hashlib
import json
import sys

from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient

client = WorkloadApiClient(default_timeout=20)
svid = client.fetch_x509_svid()
leaf = svid.leaf
der = lambda cert: cert.public_bytes(serialization.Encoding.DER)
spki = lambda key: key.public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
td = TrustDomain("cluster.local")
x509_bundle = client.fetch_x509_bundles().get_bundle_for_trust_domain(td)
jwt_bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(td)
jwt = client.fetch_jwt_svid(audience={"db"})
local = JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"db"})
remote = client.validate_jwt_svid(jwt.token, "db")
try:
    JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"someone-else"})
    wrong_audience = "accepted"
except Exception as e:  # py-spiffe raises its own error types
    wrong_audience = type(e).__name__
json.dump(
    {
        "spiffe_id": str(svid.spiffe_id),
        "leaf_sha256": hashlib.sha256(der(leaf)).hexdigest(),
        "chain_len": len(svid.cert_chain),
        "key_matches_leaf": spki(svid.private_key.public_key()) == spki(leaf.public_key()),
        "roots_sha256": sorted(
            hashlib.sha256(der(c)).hexdigest() for c in x509_bundle.x509_authorities
        ),
        "jwt_spiffe_id": str(jwt.spiffe_id),
        "jwt_audience": sorted(jwt.audience),
        "jwt_local_spiffe_id": str(local.spiffe_id),
        "jwt_validated_spiffe_id": str(remote.spiffe_id),
        "jwt_kids": sorted(jwt_bundle.jwt_authorities.keys()),
        "wrong_audience": wrong_audience,
    },
    sys.stdout,
)
