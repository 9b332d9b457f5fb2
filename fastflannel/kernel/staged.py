# SPDX-License-Identifier: Apache-2.0
"""Objects made of several kernel entries, programmed stage by stage so that each is left complete or absent.

A vxlan peer is a neighbour and an FDB entry, then a route that needs both; 5,000 peers are programmed as one
pipelined batch per stage (``kernel/nlbatch.py``), and a peer whose entry fails in a stage gets no later stage
and has its rollback deletes run. Pure: ``batch`` is any ``ops -> [error | None]`` callable (``Netlink.batch``,
or a fake in the unit tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from fastflannel.kernel.nlbatch import Op


@dataclass
class Staged:
    """One object made of several kernel entries (a vxlan peer: neighbour and FDB entry, then its route).
    ``stages`` run in order, each stage of every object in one batch; an object whose op fails in a stage gets no
    later stage and its ``rollback`` ops (deletes) run, so it is left either complete or absent."""

    stages: List[List[Op]]
    rollback: List[Op]


def run_staged(batch: Any, items: Sequence[Staged], cleanup: Sequence[Op] = ()) -> Tuple[List[Optional[BaseException]],
                                                                                       List[BaseException]]:
    """Program ``items`` with one ``batch(ops) -> [error|None]`` call per stage plus one for the rollbacks of the
    failed items and ``cleanup`` (extra deletes, e.g. a peer's previous FDB entry). Return the first error of each
    item (None = complete) and the errors of the rollback/cleanup batch (to log)."""
    first: List[Optional[BaseException]] = [None] * len(items)
    depth = max((len(x.stages) for x in items), default=0)
    for k in range(depth):
        owners, ops = [], []
        for i, item in enumerate(items):
            if first[i] is None and k < len(item.stages):
                for op in item.stages[k]:
                    owners.append(i)
                    ops.append(op)
        if not ops:
            continue
        for i, err in zip(owners, batch(ops)):
            if err is not None and first[i] is None:
                first[i] = err
    undo = [op for i, item in enumerate(items) if first[i] is not None for op in item.rollback]
    undo += list(cleanup)
    undo_errors = [e for e in batch(undo) if e is not None] if undo else []
    return first, undo_errors
