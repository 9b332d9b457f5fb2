# SPDX-License-Identifier: Apache-2.0
"""Simulate N flannel hosts, an etcd cluster and docker-style containers with network namespaces.

Design notes
------------
Tool choice. The testbed builds the simulated world with iproute2 (``ip``, ``ip -n``, ``ip netns exec``) run through
``subprocess``, while the product programs the kernel only through pyroute2 (``fastflannel/kernel/netlink.py``). Using an
independent tool means a bug in our netlink layer cannot also hide itself in the rig that tests it.

Topology (defaults are the classic flannel example)::

    <prefix>-ul   underlay namespace holding the bridge <prefix>br (no addresses; MTU 1500 by default)
      |-- veth <prefix>h1 <-> eth0 in <prefix>-h1      10.168.0.2/24   fastflanneld, docker0, containers
      |-- veth <prefix>h2 <-> eth0 in <prefix>-h2      10.168.0.3/24
      |-- ...
      |-- veth <prefix>o1 <-> eth0 in <prefix>-o1      outside host (no daemon), optional
      `-- veth <prefix>e0 <-> eth0 in <prefix>-etcd0   10.168.0.250/24, etcd client :2379, peer :2380
    <prefix>-h1-c1 etc.  container namespaces; eth0 <-> veth<N> on the host's ``docker0`` bridge

Safety. The root namespace gets no links and no addresses at all: the underlay bridge lives in its own namespace and
every veth pair is created from inside a testbed namespace (``ip -n <ns> link add ... peer ... netns <other>``), so
both ends are born outside the root namespace. Every process that talks to a testbed address (etcd, etcdctl,
daemons, ping) runs under ``ip netns exec``. Only ``ip netns add/del/pids`` runs in the root namespace.

Naming. A run's prefix is ``ff`` + 5 random base36 characters (7 chars), so ``<prefix>h12`` fits the 15-character
interface limit. Every namespace is ``<prefix>-...``. Before anything is created the owner writes
``/run/fastflannel-testbed/<prefix>.pid`` (pid, process start time, workdir); ``cleanup_stale()`` uses it to remove
what a dead owner left behind.

Teardown order (``Testbed.close()``, idempotent, also registered with ``atexit``): tracked processes get SIGTERM then
SIGKILL after a grace period; then etcd members; then every process still inside one of our namespaces is killed
(``ip netns pids``); then namespaces (containers, hosts, etcd, underlay) are deleted, which destroys the veths; then
the temp dirs and the marker go. SIGINT/SIGTERM are blocked on the main thread while this runs, so a second Ctrl-C
cannot cut teardown short; it is delivered (as KeyboardInterrupt) once teardown is done. Every command has a timeout
so teardown cannot hang. ``install_signal_handlers()`` turns SIGTERM into an exception so ``with Testbed()`` unwinds.

etcd. Each member is an ``EtcdServer`` in its own namespace with its data dir in the testbed's temp dir. ``stop()``
(SIGTERM) and ``kill()`` (SIGKILL) keep the data dir so ``start()`` restarts the same member; ``close()`` removes it.
A multi-member cluster spawns every member first and waits for health afterwards, because one member of a fresh
three-member cluster cannot become healthy before it has quorum. ``Testbed(etcd_tls=True)`` makes a CA, a server
certificate (SANs: every member address and 127.0.0.1) and a client certificate with openssl in the workdir
(``tb.tls``: paths) and serves the client URLs over https with ``--client-cert-auth`` (peer traffic stays http,
inside the testbed). ``EtcdServer.user`` ("name:password"), when set, is passed to every etcdctl call (for tests
that enable etcd authentication).
"""
from fastflannel.lab.testbed.base import (MARKER_DIR, CommandError, EtcdError, TestbedError,  # noqa: F401
                                          install_signal_handlers, restore_signal_handlers)
from fastflannel.lab.testbed.etcd import EtcdServer  # noqa: F401
from fastflannel.lab.testbed.hosts import Container, Host  # noqa: F401
from fastflannel.lab.testbed.netns import (cleanup_stale, list_netns, owned_prefixes, pid_alive,  # noqa: F401
                                           remove_namespaces)
from fastflannel.lab.testbed.tls import make_tls_files  # noqa: F401
from fastflannel.lab.testbed.world import Testbed  # noqa: F401

__all__ = [
    "CommandError",
    "Container",
    "EtcdError",
    "EtcdServer",
    "Host",
    "MARKER_DIR",
    "Testbed",
    "TestbedError",
    "cleanup_stale",
    "install_signal_handlers",
    "list_netns",
    "make_tls_files",
    "owned_prefixes",
    "pid_alive",
    "remove_namespaces",
    "restore_signal_handlers",
]
