"""The device's long-term SecAgg+ identity, kept in its encrypted store.

Provisioned once (`provision_identity`): an Ed25519 signing key made on the device, the
certificate the provisioning authority issued for it, and the authority's public key, which
the device trusts to vouch for the other devices (shared/secure_identity.py explains why).
The server never holds the authority's key, so it cannot certify keys of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from fedinterest.shared.secure_identity import Authority, certified_key, public_bytes

from .store import DeviceStore

SIGNING_KEY_BLOB = "secagg-signing-key"
CERTIFICATE_BLOB = "secagg-certificate"
AUTHORITY_BLOB = "secagg-authority"


@dataclass(frozen=True)
class DeviceIdentity:
    signing_key: Ed25519PrivateKey
    certificate: bytes
    authority_public: bytes


def provision_identity(store: DeviceStore, authority: Authority) -> bytes:
    """Make the device's signing key, have `authority` certify it, and keep all three in the
    store; returns the certificate. The private key never leaves the store."""
    key = Ed25519PrivateKey.generate()
    cert = authority.certify(public_bytes(key.public_key()))
    store.put_blob(SIGNING_KEY_BLOB, key.private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                       NoEncryption()))
    store.put_blob(CERTIFICATE_BLOB, cert)
    store.put_blob(AUTHORITY_BLOB, authority.public)
    return cert


def load_identity(store: DeviceStore) -> DeviceIdentity | None:
    """The provisioned identity, or None when the store has none."""
    raw, cert, auth = (store.get_blob(n) for n in (SIGNING_KEY_BLOB, CERTIFICATE_BLOB,
                                                   AUTHORITY_BLOB))
    if raw is None or cert is None or auth is None:
        return None
    key = Ed25519PrivateKey.from_private_bytes(raw)
    if certified_key(auth, cert) != public_bytes(key.public_key()):
        return None  # a certificate for another key: not usable
    return DeviceIdentity(key, cert, auth)
