# SPDX-License-Identifier: Apache-2.0
"""The data path's contract (fastflannel/datapath/contract.py) and the copies generated from it.

Pure: no extension needed, except where a test says so. The extension's own import-time check (its
FF_CONTRACT_HASH against contract_hash()) refuses a build made from another contract.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from impls import needs_cython

from fastflannel.datapath import contract, fastpath, twin

INCLUDES = Path(contract.__file__).parent / "includes"


def test_names_are_unique_and_indexes_follow_the_order() -> None:
    for names, index in ((contract.COUNTER_NAMES, contract.COUNTER_INDEX),
                         (contract.PEER_COUNTER_NAMES, contract.PEER_INDEX)):
        assert len(set(names)) == len(names)
        assert [index[n] for n in names] == list(range(len(names)))
    assert len(set(contract.VERDICTS)) == len(contract.VERDICTS)
    assert len(set(contract.COMMANDS.values())) == len(contract.COMMANDS)


def test_c_declarations_carry_every_counter_verdict_and_peer_field() -> None:
    text = contract.c_declarations()
    for i, name in enumerate(contract.COUNTER_NAMES):
        assert f"    C_{name.upper()} = {i}\n" in text
    assert f"FF_NCOUNTERS = {len(contract.COUNTER_NAMES)}\n" in text
    for i, v in enumerate(contract.VERDICTS):
        assert f"    V_{v.replace(':', '_').upper()} = {i}\n" in text
    for f in contract.PEER_TX_FIELDS + contract.PEER_RX_FIELDS:
        assert f"    uint64_t {f}\n" in text
    assert f"FF_CONTRACT_HASH = {contract.contract_hash()}" in text


def test_the_hash_changes_with_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    h = contract.contract_hash()
    monkeypatch.setattr(contract, "COUNTER_NAMES", contract.COUNTER_NAMES + ("new_counter",))
    assert contract.contract_hash() != h


@needs_cython
def test_the_generated_pxd_is_the_current_contract() -> None:
    assert (INCLUDES / "contract.pxd").read_text() == contract.c_declarations()


def test_batch_buckets_are_the_contracts() -> None:
    bounds = [contract.batch_bucket(n) for n in (0, 1, 2, 4, 5, 16, 17, 64, 65, 10**6)]
    assert bounds == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_the_implementations_and_the_facade_share_the_contract() -> None:
    assert twin.COUNTER_NAMES is contract.COUNTER_NAMES and fastpath.COUNTER_NAMES is contract.COUNTER_NAMES
    assert twin.FastPathError is contract.FastPathError is fastpath.FastPathError
