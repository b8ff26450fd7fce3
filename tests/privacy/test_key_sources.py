"""Issue 19, finding 7 (key): the ClientApp accepted only a raw key file beside the database.
A deployed SuperNode's node config now names exactly one of `key-file`, `passphrase-env` (the
name of an environment variable holding the passphrase; scrypt) or `keyring-service` (the OS
keyring through the optional `keyring` package)."""

from __future__ import annotations

import sys
import types

import pytest
from fedinterest.client import client_app as capp
from fedinterest.client.crypto import ScryptParams, key_arguments
from fedinterest.client.device import Device
from fedinterest.shared.errors import ConfigError
from flwr.app import Context, RecordDict

FAST = ScryptParams(n=2**10)


def _ctx(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def _make_store(tmp_path, passphrase: str):
    path = tmp_path / "device.db"
    with Device.open(path, passphrase=passphrase, scrypt=FAST) as dev:
        dev.store.add_event("1", 1_000)
        return path, dev.pseudonym


def test_passphrase_from_an_environment_variable(tmp_path, monkeypatch):
    path, pid = _make_store(tmp_path, "correct horse battery staple")
    monkeypatch.setenv("FEDINTEREST_STORE_PASSPHRASE", "correct horse battery staple")
    store, key = capp._store_key(_ctx({"store": str(path),
                                       "passphrase-env": "FEDINTEREST_STORE_PASSPHRASE"}), {})
    with Device.open(store, create=False, **key) as dev:
        assert dev.pseudonym == pid
    monkeypatch.delenv("FEDINTEREST_STORE_PASSPHRASE")
    with pytest.raises(ConfigError, match="FEDINTEREST_STORE_PASSPHRASE"):
        capp._store_key(_ctx({"store": str(path),
                              "passphrase-env": "FEDINTEREST_STORE_PASSPHRASE"}), {})


def test_the_os_keyring_through_the_keyring_package(tmp_path, monkeypatch):
    path, pid = _make_store(tmp_path, "from the keychain")
    asked = []

    def get_password(service, username):
        asked.append((service, username))
        return "from the keychain" if service == "fedinterest" else None

    monkeypatch.setitem(sys.modules, "keyring", types.SimpleNamespace(get_password=get_password))
    key = key_arguments({"store": str(path), "keyring-service": "fedinterest"}, path)
    with Device.open(path, create=False, **key) as dev:
        assert dev.pseudonym == pid
    assert asked == [("fedinterest", "device.db")]  # keyring-user defaults to the file name
    with pytest.raises(ConfigError, match="holds no secret"):
        key_arguments({"keyring-service": "other"}, path)


def test_a_missing_keyring_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "keyring", None)  # import keyring -> ImportError
    with pytest.raises(ConfigError, match="'keyring' package"):
        key_arguments({"keyring-service": "fedinterest"}, tmp_path / "device.db")


def test_exactly_one_key_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        key_arguments({"key-file": "k", "passphrase-env": "P"}, tmp_path / "d.db")
    with pytest.raises(ConfigError, match="exactly one"):
        key_arguments({}, tmp_path / "d.db")
