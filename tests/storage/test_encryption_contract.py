"""The MessageStore contract suite again, against a file store that seals every record (encryption at rest on).

Encryption must change nothing a caller of the store can see; the tests are the contract module's own, collected
here a second time with the `store` fixture below instead of the plain one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidegate.core.storage.encryption import Keyring
from tidegate.core.storage.filestore import FileMessageStore

_spec = importlib.util.spec_from_file_location(
    "_store_contract_for_encryption", Path(__file__).with_name("test_storage_store_contract.py"))
assert _spec is not None and _spec.loader is not None
_contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_contract)
globals().update({name: value for name, value in vars(_contract).items() if name.startswith("test_")})

KEYRING = Keyring({"k1": bytes(range(32)), "k2": bytes(range(1, 33))}, "k2")


@pytest.fixture
def store(tmp_path, clock) -> Iterator:
    s = FileMessageStore(tmp_path / "data", segment_bytes=4096, index_entries_per_file=8, clock_ms=clock,
                         keyring=KEYRING)  # the sizes of conftest.open_file_store
    yield s
    s.close()


def test_this_suite_really_runs_on_sealed_records(store):
    from tidegate.core.model import Message, QueueRef
    from tidegate.core.storage.record import ENCRYPTED_MAGIC, PREFIX

    result = store.append(Message("orders", b"x"), [QueueRef("orders", 0)])
    assert PREFIX.unpack_from(store._log.read(result.commit_offset))[1] == ENCRYPTED_MAGIC
