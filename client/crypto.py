"""Key handling and authenticated encryption for the on-device store.

A 32-byte master key comes from a passphrase (scrypt, memory-hard so a stolen file resists
guessing) or from a 32-byte key file (e.g. one the OS keystore hands out). Two sub-keys are
derived from it with HKDF so the one secret never serves two algorithms: an AES-256-GCM key
for values and an HMAC-SHA256 key for row tags over the plaintext columns.

Every encrypted value carries a fresh random 96-bit nonce and associated data naming its
table, row and column, so a ciphertext moved to another row or column fails authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from fedinterest.shared.errors import ConfigError

KEY_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES = 12  # 96 bits, the size AES-GCM is specified for
_KEY_CHECK_PLAINTEXT = b"fedinterest device store key check v1"

__all__ = [
    "KEY_BYTES",
    "SALT_BYTES",
    "InvalidTag",
    "ScryptParams",
    "Sealer",
    "associated_data",
    "master_key_from_key_file",
    "master_key_from_passphrase",
    "new_salt",
]


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost. The default (N=2**15, r=8, p=1) needs 32 MiB and roughly 0.1-0.3 s on a
    recent phone: the interactive-login setting of the scrypt paper, affordable once per app
    start. Tests pass a tiny N to stay fast; the chosen parameters are stored with the salt."""

    n: int = 2**15
    r: int = 8
    p: int = 1

    # Bounds checked when parameters are read back from a file, so a crafted store cannot
    # make the app allocate gigabytes (128 * r * n bytes) before the key check even runs.
    MAX_N = 2**20
    MAX_R = 32
    MAX_P = 16

    def validate(self, where: str = "scrypt parameters") -> ScryptParams:
        n_ok = isinstance(self.n, int) and 2 <= self.n <= self.MAX_N and self.n & (self.n - 1) == 0
        if not n_ok:
            raise ConfigError(
                f"{where}: n must be a power of two in [2, {self.MAX_N}], got {self.n!r}")
        if not (isinstance(self.r, int) and 1 <= self.r <= self.MAX_R):
            raise ConfigError(f"{where}: r must be an integer in [1, {self.MAX_R}], got {self.r!r}")
        if not (isinstance(self.p, int) and 1 <= self.p <= self.MAX_P):
            raise ConfigError(f"{where}: p must be an integer in [1, {self.MAX_P}], got {self.p!r}")
        return self


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


def master_key_from_passphrase(
    passphrase: str | bytes, salt: bytes, params: ScryptParams
) -> bytes:
    """scrypt(passphrase). Text is NFC-normalised first so the same passphrase typed on two
    keyboards that compose accents differently gives the same key."""
    if isinstance(passphrase, str):
        passphrase = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    if not isinstance(passphrase, bytes) or not passphrase:
        raise ConfigError("passphrase: expected a non-empty str or bytes")
    params.validate()
    kdf = Scrypt(salt=salt, length=KEY_BYTES, n=params.n, r=params.r, p=params.p)
    return kdf.derive(passphrase)


def master_key_from_key_file(path: str | os.PathLike) -> bytes:
    """The raw 32 bytes of a key file; anything else is an error naming the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"key_file {p}: cannot read it ({e.strerror or e})") from e
    if len(data) != KEY_BYTES:
        raise ConfigError(
            f"key_file {p}: expected exactly {KEY_BYTES} raw bytes, found {len(data)} "
            f"(create one with: head -c {KEY_BYTES} /dev/urandom > {p.name})"
        )
    return data


def associated_data(table: str, row: int | str, column: str) -> bytes:
    """Unambiguous encoding of where a value lives (JSON keeps 1 and "1" apart, and no
    separator inside a name can make two locations collide)."""
    return json.dumps(["fedinterest.store", table, row, column]).encode("utf-8")


class Sealer:
    """Encrypts/decrypts values and computes row tags with sub-keys of one master key."""

    def __init__(self, master_key: bytes, salt: bytes):
        if len(master_key) != KEY_BYTES:
            raise ValueError("master key must be 32 bytes")

        def sub_key(label: bytes) -> bytes:
            kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=label)
            return kdf.derive(master_key)

        self._aead = AESGCM(sub_key(b"fedinterest.store.v1 aes-256-gcm values"))
        self._mac_key = sub_key(b"fedinterest.store.v1 hmac-sha256 row tags")

    def seal(self, plaintext: bytes, table: str, row: int | str, column: str) -> bytes:
        """nonce || ciphertext+tag."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated_data(table, row, column))

    def open(self, sealed: bytes, table: str, row: int | str, column: str) -> bytes:
        """Raises cryptography's InvalidTag if the value was altered, moved or the key is wrong."""
        if not isinstance(sealed, bytes) or len(sealed) < NONCE_BYTES + 16:
            raise InvalidTag()
        nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        return self._aead.decrypt(nonce, body, associated_data(table, row, column))

    def key_check(self) -> bytes:
        return self.seal(_KEY_CHECK_PLAINTEXT, "meta", "key_check", "value")

    def verify_key_check(self, sealed: bytes) -> bool:
        try:
            return self.open(sealed, "meta", "key_check", "value") == _KEY_CHECK_PLAINTEXT
        except InvalidTag:
            return False

    def row_tag(self, table: str, fields: list) -> bytes:
        """HMAC over a row's plaintext columns (JSON-encoded, floats as exact hex)."""
        msg = json.dumps([table, *fields]).encode("utf-8")
        return hmac.new(self._mac_key, msg, hashlib.sha256).digest()

    def check_row_tag(self, tag: bytes | None, table: str, fields: list) -> bool:
        return isinstance(tag, bytes) and hmac.compare_digest(tag, self.row_tag(table, fields))


def passphrase_from_env(name: str) -> str:
    """The passphrase in environment variable `name` (a deployment's secret manager or
    service unit sets it; it is never written beside the store)."""
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"passphrase-env: environment variable {name!r} is not set or empty")
    return value


def passphrase_from_keyring(service: str, username: str) -> str:
    """The passphrase the OS keyring (macOS Keychain, Windows Credential Locker, Secret
    Service) holds for (`service`, `username`), through the optional `keyring` package."""
    try:
        import keyring
    except ImportError:
        raise ConfigError("keyring-service: the OS keyring needs the 'keyring' package "
                          "(pip install keyring); or use key-file / passphrase-env") from None
    value = keyring.get_password(service, username)
    if not value:
        raise ConfigError(f"keyring-service: the OS keyring holds no secret for service "
                          f"{service!r}, user {username!r}")
    return value


def key_arguments(node_config: dict, store: Path) -> dict:
    """DeviceStore.open's key argument from a SuperNode's node config: exactly one of
    `key-file` (32 raw bytes), `passphrase-env` (the name of an environment variable holding
    the passphrase) or `keyring-service` (with `keyring-user`, default the store's file
    name: the OS keyring entry holding the passphrase)."""
    given = [k for k in ("key-file", "passphrase-env", "keyring-service") if k in node_config]
    if len(given) != 1:
        raise ConfigError(f"node config for store {store}: set exactly one of key-file, "
                          f"passphrase-env, keyring-service (got {given or 'none'})")
    if given[0] == "key-file":
        return {"key_file": Path(str(node_config["key-file"]))}
    if given[0] == "passphrase-env":
        return {"passphrase": passphrase_from_env(str(node_config["passphrase-env"]))}
    user = str(node_config.get("keyring-user", store.name))
    return {"passphrase": passphrase_from_keyring(str(node_config["keyring-service"]), user)}
