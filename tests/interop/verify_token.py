"""Verify a meshid access token with PyJWT, knowing only the CA's metadata URL and bundle.

usage: verify_token.py METADATA_URL BUNDLE_PEM TOKEN SVID_PEM AUD SUB CLIENT_ID SCOPE

Discovers jwks_uri from RFC 8414 metadata (TLS with ordinary hostname checks against the
bundle), then checks the RFC 9068 profile and the RFC 8705 certificate binding. Prints OK or
exits 1 with what is wrong.
"""
import base64
import hashlib
import json
import ssl
import sys
import urllib.request

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def main():
    metadata_url, bundle, token, svid, aud, sub, client_id, scope = sys.argv[1:9]
    ctx = ssl.create_default_context(cafile=bundle)
    meta = json.load(urllib.request.urlopen(metadata_url, context=ctx))
    if meta.get("tls_client_certificate_bound_access_tokens") is not True:
        fail("metadata does not announce certificate-bound tokens")
    if "tls_client_auth" not in meta.get("token_endpoint_auth_methods_supported", []):
        fail("metadata does not announce tls_client_auth")
    if not metadata_url.startswith(meta["issuer"] + "/.well-known/"):
        fail(f"issuer {meta['issuer']} does not match the metadata URL (RFC 8414 section 3.3)")
    jwks = json.load(urllib.request.urlopen(meta["jwks_uri"], context=ctx))

    header = jwt.get_unverified_header(token)
    if header.get("typ") != "at+jwt":
        fail(f"typ is {header.get('typ')!r}")
    keys = [k for k in jwks["keys"] if k.get("kid") == header.get("kid")]
    if len(keys) != 1:
        fail(f"kid {header.get('kid')!r} is not in the JWKS")
    key = jwt.PyJWK(keys[0])
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["ES256", "EdDSA"],
        audience=aud,
        issuer=meta["issuer"],
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
    )
    for name, want in [("sub", sub), ("client_id", client_id), ("scope", scope)]:
        if claims.get(name) != want:
            fail(f"{name} is {claims.get(name)!r}, want {want!r}")
    if not 0 < claims["exp"] - claims["iat"] <= 15 * 60:
        fail("lifetime is not within (0, 15 min]")

    leaf = x509.load_pem_x509_certificates(open(svid, "rb").read())[0]
    thumb = base64.urlsafe_b64encode(hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest()).rstrip(b"=").decode()
    if claims.get("cnf", {}).get("x5t#S256") != thumb:
        fail("cnf.x5t#S256 is not the SHA-256 of the caller's certificate")
    print("OK")


if __name__ == "__main__":
    main()
