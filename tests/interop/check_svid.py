"""Check an X509-SVID with a parser that is not meshid's (Python cryptography).

usage: check_svid.py SVID_PEM BUNDLE_PEM EXPECTED_SPIFFE_ID MAX_TTL_SECONDS

Checks every rule of the SPIFFE X509-SVID spec that meshid promises, and that the chain
verifies to a root of the bundle with cryptography's own path builder. Prints OK or exits 1
with the broken rule.
"""
import datetime
import sys

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def main():
    svid_path, bundle_path, want_id, max_ttl = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    chain = x509.load_pem_x509_certificates(open(svid_path, "rb").read())
    roots = x509.load_pem_x509_certificates(open(bundle_path, "rb").read())
    leaf = chain[0]

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [want_id]:
        fail(f"URI SANs are {uris}, want exactly [{want_id}]")

    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    if bc.ca:
        fail("leaf says CA:true")

    ku_ext = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    ku = ku_ext.value
    if not ku_ext.critical:
        fail("key usage is not critical")
    if not ku.digital_signature or ku.key_cert_sign or ku.crl_sign or ku.key_encipherment:
        fail(f"key usage is {ku}, want digitalSignature only")

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    if set(eku) != {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}:
        fail(f"EKU is {list(eku)}, want serverAuth+clientAuth")

    if leaf.serial_number <= 0 or leaf.serial_number.bit_length() < 64:
        fail(f"serial {leaf.serial_number:x} is not a positive random number of >= 64 bits")

    pub = leaf.public_key()
    if not (isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1") and not isinstance(
        pub, ed25519.Ed25519PublicKey
    ):
        fail(f"leaf key is {type(pub).__name__}")

    life = (leaf.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    if not 0 < life <= max_ttl:
        fail(f"leaf has {life:.0f}s left, want (0, {max_ttl}]")

    # Each hop signed by the next, and the top one by a root of the bundle.
    for child, parent in zip(chain, chain[1:]):
        child.verify_directly_issued_by(parent)
    top = chain[-1]
    if not any(_issued_by(top, r) for r in roots):
        fail("chain does not end at a root of the bundle")

    # And cryptography's own path building, as a TLS client-certificate verifier would do it.
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(leaf, chain[1:])
    if x509.UniformResourceIdentifier(want_id) not in verified.subjects:
        fail(f"verified subjects {verified.subjects} lack {want_id}")
    print("OK")


def _issued_by(cert, root):
    try:
        cert.verify_directly_issued_by(root)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
