# SPDX-License-Identifier: Apache-2.0
"""UdpOptions (backend/udp_options.py): the udp backend's switches from Backend and the environment, one place."""
from __future__ import annotations

import pytest

from fastflannel.backend.udp import fastpath_options
from fastflannel.backend.udp_options import ENV, UdpOptions
from fastflannel.errors import BackendError


def backend(**opts):
    return lambda name, default=None: opts.get(name, default)


def test_defaults_are_the_measured_ones() -> None:
    o = UdpOptions.load(backend(), {})
    assert o == UdpOptions()
    assert (o.port, o.check_peer_source, o.check_inner_dest, o.tun_offload, o.udp_gso, o.udp_gro) == (
        8285, True, True, True, True, True)
    assert o.threads() == 1  # both offloads on: one loop thread
    assert UdpOptions(tun_offload=False).threads() == 2 and UdpOptions(udp_gro=False).threads() == 2


def test_backend_port_and_every_environment_variable_are_read() -> None:
    env = {ENV["check_peer_source"]: "0", ENV["check_inner_dest"]: "off", ENV["tun_offload"]: "no",
           ENV["udp_gso"]: "false", ENV["udp_gro"]: "0", ENV["bench_threads"]: "2", ENV["bench_spin"]: "0",
           ENV["bench_busy_poll_us"]: "50", ENV["bench_loop_priority"]: "nice:-5", ENV["bench_txqueuelen"]: "500", ENV["bench_rcvbuf"]: "8388608", ENV["bench_gso_max_size"]: "62000"}
    o = UdpOptions.load(backend(Port=9000), env)
    assert o == UdpOptions(port=9000, check_peer_source=False, check_inner_dest=False, tun_offload=False,
                           udp_gso=False, udp_gro=False, bench_threads=2, bench_spin=0, bench_busy_poll_us=50,
                           bench_loop_priority="nice:-5", bench_txqueuelen=500,
                           bench_rcvbuf=8 << 20, bench_gso_max_size=62000)
    assert set(ENV) == {f for f in UdpOptions.__dataclass_fields__ if f != "port"}  # every switch has a variable
    fp = fastpath_options(o, o.threads())
    assert (fp.check_peer_source, fp.check_inner_dest, fp.tun_offload, fp.udp_gso, fp.udp_gro, fp.spin,
            fp.busy_poll_us, fp.loop_priority, fp.threads) == (False, False, False, False, False, 0, 50, "nice:-5", 2)


def test_an_empty_variable_and_port_0_keep_the_default() -> None:
    assert UdpOptions.load(backend(Port=0), {ENV["udp_gro"]: "", ENV["bench_spin"]: " "}) == UdpOptions()


@pytest.mark.parametrize("env, what", [
    ({"FASTFLANNEL_UDP_GRO": "maybe"}, "FASTFLANNEL_UDP_GRO='maybe': not a switch"),
    ({"FASTFLANNEL_UDP_SPIN": "fast"}, "FASTFLANNEL_UDP_SPIN='fast': not an integer"),
    ({"FASTFLANNEL_UDP_THREADS": "3"}, "FASTFLANNEL_UDP_THREADS=3: out of range 1..2"),
    ({"FASTFLANNEL_UDP_LOOP_PRIORITY": "rt"}, "FASTFLANNEL_UDP_LOOP_PRIORITY='rt': loop priority"),
])
def test_bad_values_name_the_variable(env, what) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackendError, match=what.replace("(", r"\(").replace(".", r"\.")):
        UdpOptions.load(backend(), env)


@pytest.mark.parametrize("port", [65536, "8285", True, -1])
def test_bad_port(port) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackendError, match="Backend.Port"):
        UdpOptions.load(backend(Port=port), {})
