"""Authenticated SecAgg+ keys: device signing keys certified by a provisioning authority.

Flower's SecAgg+ relays each device's two key-agreement public keys through the server. An
active server that swaps a victim's neighbours' keys for its own learns the pairwise masks
and the share-encryption keys, and unmasks the victim's update. So each device holds a
long-term Ed25519 signing key, certified by a provisioning authority the devices trust and
the server does not hold (in simulation: a key the runner makes when it provisions the
devices; in deployment: the app vendor's key, or Flower's SuperNode authentication key where
a deployment exposes it to the ClientApp, see docs/PRIVACY.md). A device signs its
SecAgg+ public keys together with its node id; every device verifies the certificate and the
signature of each neighbour's relayed keys before it shares anything, and aborts the round
otherwise (client/secagg.py).

Wire: the SETUP reply carries `CERT_KEY` (certificate) and `SIG_KEY` (signature); the server
relays them in SHARE_KEYS under `AUTH_PREFIX + <node id>` as [certificate, signature].
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import FedinterestError

CERT_KEY = "fi-device-cert"
SIG_KEY = "fi-key-sig"
AUTH_PREFIX = "fi-auth-"
_CERT_DOMAIN = b"fedinterest-device-certificate-v1"
_KEYS_DOMAIN = b"fedinterest-secagg-keys-v1"
PUBLIC_LEN, SIG_LEN = 32, 64


class IdentityError(FedinterestError):
    """A certificate or a signature does not verify."""


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class Authority:
    """The provisioning authority: certifies device signing keys. Not the server."""

    key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Authority:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> bytes:
        return public_bytes(self.key.public_key())

    def certify(self, device_public: bytes) -> bytes:
        """A certificate: the device's public key and the authority's signature over it."""
        if len(device_public) != PUBLIC_LEN:
            raise IdentityError(f"a device public key has {PUBLIC_LEN} bytes, got "
                                f"{len(device_public)}")
        return device_public + self.key.sign(_CERT_DOMAIN + device_public)


def certified_key(authority_public: bytes, certificate: bytes) -> bytes:
    """The device public key a certificate vouches for; IdentityError unless the trusted
    authority signed it."""
    if not isinstance(certificate, bytes) or len(certificate) != PUBLIC_LEN + SIG_LEN:
        raise IdentityError("malformed device certificate")
    device_public, sig = certificate[:PUBLIC_LEN], certificate[PUBLIC_LEN:]
    try:
        Ed25519PublicKey.from_public_bytes(authority_public).verify(sig, _CERT_DOMAIN
                                                                    + device_public)
    except InvalidSignature:
        raise IdentityError("device certificate not signed by the provisioning "
                            "authority") from None
    return device_public


def key_statement(node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    """What a device signs: its node id and its two SecAgg+ public keys of this round."""
    def part(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    return _KEYS_DOMAIN + int(node_id).to_bytes(8, "big") + part(pk1) + part(pk2)


def sign_keys(signing_key: Ed25519PrivateKey, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    return signing_key.sign(key_statement(node_id, pk1, pk2))


def verify_keys(authority_public: bytes, certificate: bytes, signature: bytes, node_id: int,
                pk1: bytes, pk2: bytes) -> bytes:
    """Check that a certified device signed (node id, pk1, pk2); returns its public key."""
    device_public = certified_key(authority_public, certificate)
    try:
        Ed25519PublicKey.from_public_bytes(device_public).verify(
            signature, key_statement(node_id, pk1, pk2))
    except (InvalidSignature, TypeError, ValueError):
        raise IdentityError(f"the SecAgg+ keys relayed for node {node_id} are not signed by "
                            "a certified device") from None
    return device_public
