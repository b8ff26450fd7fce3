"""Cryptographic mask generator for Flower's SecAgg+, and the switch that puts it in force.

Why: Flower 1.42's `secaggplus_utils.pseudo_rand_gen` XOR-folds the 32-byte seed into 32 bits
and feeds numpy's MT19937, so every mask is one of 2**32 streams and anyone can enumerate them
(or recover the MT state from 624 outputs). Ours keys AES-256-CTR with HKDF-SHA256 over the
whole seed, so a mask is as strong as the seed it comes from.

Contract kept from Flower (client and server must compute identical masks): same signature,
one int64 array per requested shape (a 0-d array for shape ``()``), values in
``[0, num_range)``, to be combined modulo ``num_range``. One deliberate difference: Flower draws
``randint(0, num_range - 1)``, i.e. never the value ``num_range - 1``; a mask must be uniform
over all of Z_num_range, so ours includes it. Both sides must run ours (see `install`).

Reduction to the range is exact, not "negligibly biased": for a power of two (the only moduli
SecAggPlusWorkflow accepts) we keep the low bits of 64-bit keystream words; for any other
modulus we use rejection sampling on 64-bit words, which is exactly uniform too.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import ModuleType

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# Names the generator on the wire (SecAgg+ setup handshake) and in audits; bump the version
# whenever the byte stream would change, because both sides must derive identical masks.
PRG_ID = "fedinterest/secagg-mask/hkdf-sha256/aes-256-ctr/v1"
# Config key the hardened server sends in the SETUP stage and the hardened device echoes.
PRG_CONFIG_KEY = "fedinterest_mask_prg"

_HKDF_INFO = PRG_ID.encode("ascii")  # domain separation from every other use of the seed
_MIN_SEED_BYTES = 16  # a 128-bit floor; Flower passes 32-byte seeds and 44-byte Fernet keys
_MAX_RANGE = 2**63  # outputs are int64
_WORD = np.dtype("<u8")  # little-endian so the stream is identical on every platform

_FLOWER_MODULE = "flwr.common.secure_aggregation.secaggplus_utils"
# Every module of Flower 1.42 that binds `pseudo_rand_gen` (checked with grep over the installed
# package): the definition site plus the two `from ... import pseudo_rand_gen` sites.
KNOWN_IMPORT_SITES = (
    _FLOWER_MODULE,
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)


def pseudo_rand_gen(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Masks of the given shapes, uniform over [0, num_range), from one seed (drop-in).

    The seed is stretched with HKDF-SHA256 (info = PRG_ID) into an AES-256 key; the arrays are
    consecutive slices of that key's CTR keystream, so no two arrays share keystream.
    """
    if not isinstance(seed, bytes | bytearray) or len(seed) < _MIN_SEED_BYTES:
        raise ValueError(
            f"mask seed must be bytes of at least {_MIN_SEED_BYTES} bytes, "
            f"got {type(seed).__name__} of length {len(seed) if hasattr(seed, '__len__') else '?'}"
        )
    if isinstance(num_range, bool) or not isinstance(num_range, int | np.integer):
        raise TypeError(f"num_range must be an int, got {type(num_range).__name__}")
    num_range = int(num_range)
    if not 2 <= num_range <= _MAX_RANGE:
        raise ValueError(f"num_range must be in [2, 2**63], got {num_range}")

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(bytes(seed))
    # A zero nonce is safe: the key is unique per seed, and one call uses one stream.
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def words(count: int) -> np.ndarray:
        return np.frombuffer(encryptor.update(bytes(count * _WORD.itemsize)), dtype=_WORD)

    return [
        _uniform(words, num_range, int(np.prod(shape, dtype=np.int64))).reshape(shape)
        for shape in (tuple(dims) for dims in dimensions_list)
    ]


def _uniform(words: Callable[[int], np.ndarray], num_range: int, count: int) -> np.ndarray:
    """`count` exactly uniform int64 values in [0, num_range) drawn from 64-bit words."""
    if num_range & (num_range - 1) == 0:  # power of two: low bits of a uniform word
        return (words(count) & np.uint64(num_range - 1)).astype(np.int64)
    # Rejection sampling: accept words below the largest multiple of num_range that fits in
    # 64 bits, so `% num_range` is uniform. Acceptance is > 1/2 (num_range <= 2**63).
    limit = np.uint64((2**64 // num_range) * num_range)
    out = np.empty(0, dtype=np.uint64)
    while out.size < count:
        need = count - out.size
        batch = words(need + need // 8 + 8)
        out = np.concatenate([out, batch[batch < limit][:need]])
    return (out % np.uint64(num_range)).astype(np.int64)


def is_flower_generator(obj: object) -> bool:
    """True for Flower's weak generator, including a copy made by reloading its module."""
    return (
        callable(obj)
        and getattr(obj, "__module__", None) == _FLOWER_MODULE
        and getattr(obj, "__qualname__", None) == "pseudo_rand_gen"
    )


def _flower_generator() -> Callable[..., list[np.ndarray]]:
    utils = _import(_FLOWER_MODULE)
    saved = vars(utils).get("_fedinterest_flower_pseudo_rand_gen")
    return saved if saved is not None else utils.pseudo_rand_gen


def flower_pseudo_rand_gen(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Flower's original generator, still callable after `install` (tests and audits)."""
    return _flower_generator()(seed, num_range, dimensions_list)


def _import(name: str) -> ModuleType:
    __import__(name)
    return sys.modules[name]


_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Make every SecAgg+ mask in this process come from `pseudo_rand_gen` (idempotent).

    Permanent on purpose. Flower's stages read the module global `pseudo_rand_gen` at call
    time, and one process can hold several SecAgg+ parties at once: `run_simulation` runs the
    ServerApp in a thread beside Flower's own threads, Ray actors may host several ClientApps,
    and an in-process harness (our tests) runs server and devices together. A patch-then-
    restore context manager would let one thread's restore hand Flower's generator to another
    thread mid-round: a device would then mask with MT19937 (predictable) or with a generator
    the server does not use (garbage sum). A replacement that is never undone has no such
    window: once set, every reader in every thread sees ours; rebinding a module global is a
    single atomic store under the GIL. The cost: in this process Flower's plain
    `secaggplus_mod` / `SecAggPlusWorkflow` use our generator too, which is what we want.

    We rebind the definition in `secaggplus_utils` (so any later `from ... import` gets ours)
    and every global, in any loaded module and under any name, bound to Flower's function.
    """
    global _installed
    if _installed and all(
        vars(_import(name)).get("pseudo_rand_gen") is pseudo_rand_gen for name in KNOWN_IMPORT_SITES
    ):
        return
    with _install_lock:
        utils = _import(_FLOWER_MODULE)
        if "_fedinterest_flower_pseudo_rand_gen" not in vars(utils):
            utils._fedinterest_flower_pseudo_rand_gen = utils.pseudo_rand_gen
        for name in KNOWN_IMPORT_SITES:
            _import(name)
        for module, attr in _weak_bindings():
            setattr(module, attr, pseudo_rand_gen)
        _installed = True


def _weak_bindings() -> list[tuple[ModuleType, str]]:
    """(module, global name) pairs still bound to Flower's generator, in loaded modules.

    Reads module `__dict__`s directly so lazy modules' `__getattr__` is never triggered.
    """
    found = []
    for module in list(sys.modules.values()):
        if not isinstance(module, ModuleType):
            continue
        for attr, value in list(vars(module).items()):
            if attr != "_fedinterest_flower_pseudo_rand_gen" and is_flower_generator(value):
                found.append((module, attr))
    return found


def mask_generator_is_hardened() -> bool:
    """Audit: True iff every SecAgg+ mask this process computes would come from ours.

    Checks the known Flower import sites directly and then every loaded module for a global
    still bound to Flower's generator.
    """
    known_ok = all(
        vars(_import(name)).get("pseudo_rand_gen") is pseudo_rand_gen for name in KNOWN_IMPORT_SITES
    )
    return known_ok and not _weak_bindings()
