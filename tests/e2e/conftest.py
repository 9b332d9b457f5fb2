# SPDX-License-Identifier: Apache-2.0
"""The e2e tier's cluster fixtures and the daemon logs of every live cluster when a test fails.

- ``bed``: a 3-host cluster shared by a module's tests of one backend (parametrize ``bed`` indirectly with the
  backend name), torn down before the next backend's is built;
- ``make_cluster(backend, n_hosts=3, env=..., config=..., containers=True, **testbed_kwargs)``: a cluster for one
  test (``containers=False``: daemons only, for control-plane tests).
Both return a ``cluster.Cluster``: converged, one container per host, every container pinging every other.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from cluster import LIVE, Cluster


@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest, make_module_testbed) -> Iterator[Cluster]:
    c = Cluster.build(make_module_testbed(3), request.param)
    LIVE.append(c)
    try:
        yield c
    finally:
        c.close()  # free this world before the next backend's (the factory's close at module end is idempotent)


@pytest.fixture
def make_cluster(make_testbed) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(backend: str, n_hosts: int = 3, *, env: dict | None = None, config: dict | None = None,
             containers: bool = True, **testbed_kw) -> Cluster:
        c = Cluster.build(make_testbed(n_hosts, **testbed_kw), backend, env=env, config=config,
                          containers=containers)
        LIVE.append(c)
        made.append(c)
        return c

    yield make
    for c in made:  # make_testbed closes the testbeds
        if c in LIVE:
            LIVE.remove(c)


@pytest.fixture(autouse=True)
def _dump_cluster_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for c in LIVE:
            c.dump_logs()
