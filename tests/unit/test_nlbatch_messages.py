# SPDX-License-Identifier: Apache-2.0
"""kernel/nlbatch.py without root: message encoding (checked with pyroute2's decoder, an independent
implementation), ACK matching by sequence number (out of order, split over datagrams, lost, with the kernel's
extended-ACK text), the pipelined send loop against a scripted fake socket, and staged programming with rollback."""
from __future__ import annotations

import errno
import struct
from ipaddress import IPv4Network

import pytest

from fastflannel.kernel import nlbatch as B
from fastflannel.kernel import staged as S

HDR = struct.Struct("=IHHII")


def _decode(cls, data):
    m = cls(data)
    m.decode()
    return m


def test_route_replace_encoding_decodes_with_pyroute2():
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    mtype, flags, body = B.encode(B.route_replace("100.96.2.0/24", "100.96.2.0", 7, True))
    assert mtype == B.RTM_NEWROUTE and flags == B.NLM_F_REQUEST | B.NLM_F_ACK | B.NLM_F_CREATE | B.NLM_F_REPLACE
    m = _decode(rtmsg, B.frame(mtype, flags, 42, body))
    assert m["header"]["sequence_number"] == 42 and m["header"]["length"] == len(body) + 16
    assert (m["family"], m["dst_len"], m["table"], m["proto"], m["scope"], m["type"]) == (2, 24, 254, 3, 0, 1)
    assert m["flags"] == B.RTNH_F_ONLINK
    assert (m.get_attr("RTA_DST"), m.get_attr("RTA_GATEWAY"), m.get_attr("RTA_OIF")) == ("100.96.2.0", "100.96.2.0", 7)
    _, _, body = B.encode(B.route_replace("fd00:1::/64", "fe80::1", 3, False, table=1000))
    m = _decode(rtmsg, B.frame(B.RTM_NEWROUTE, 0, 1, body))
    assert (m["family"], m["dst_len"], m["table"], m.get_attr("RTA_TABLE")) == (10, 64, 0, 1000)
    # a device route: scope link unless the caller names one (flanneld's udp route into flannel0 is universe)
    for scope, want in ((None, B.RT_SCOPE_LINK), (B.RT_SCOPE_UNIVERSE, 0)):
        _, _, body = B.encode(B.route_replace("100.96.0.0/16", None, 5, scope=scope))
        m = _decode(rtmsg, B.frame(B.RTM_NEWROUTE, 0, 1, body))
        assert (m["scope"], m.get_attr("RTA_GATEWAY"), m.get_attr("RTA_OIF")) == (want, None, 5)
    mtype, flags, body = B.encode(B.route_del("100.96.2.0/24"))
    m = _decode(rtmsg, B.frame(mtype, flags, 1, body))
    assert mtype == B.RTM_DELROUTE and flags == B.NLM_F_REQUEST | B.NLM_F_ACK and m["scope"] == 255
    assert m.get_attr("RTA_GATEWAY") is None and m.get_attr("RTA_OIF") is None


def test_neigh_and_fdb_encoding_decodes_with_pyroute2():
    from pyroute2.netlink.rtnl.ndmsg import ndmsg

    m = _decode(ndmsg, B.frame(*B.encode(B.neigh_replace(9, "100.96.2.0", "0A:58:00:00:00:0B"))[:2], 5,
                               B.encode(B.neigh_replace(9, "100.96.2.0", "0A:58:00:00:00:0B"))[2]))
    assert (m["family"], m["ifindex"], m["state"], m["flags"]) == (2, 9, B.NUD_PERMANENT, 0)
    assert (m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR")) == ("100.96.2.0", "0a:58:00:00:00:0b")
    mtype, flags, body = B.encode(B.fdb_replace(9, "0a:58:00:00:00:0b", "10.168.0.3"))
    m = _decode(ndmsg, B.frame(mtype, flags, 6, body))
    assert (m["family"], m["state"], m["flags"]) == (B.AF_BRIDGE, B.NUD_PERMANENT, B.NTF_SELF)
    assert (m.get_attr("NDA_LLADDR"), m.get_attr("NDA_DST")) == ("0a:58:00:00:00:0b", "10.168.0.3")
    mtype, _, body = B.encode(B.fdb_del(9, "0a:58:00:00:00:0b"))
    assert mtype == B.RTM_DELNEIGH and _decode(ndmsg, B.frame(mtype, 0, 7, body)).get_attr("NDA_DST") is None
    with pytest.raises(ValueError, match="not a MAC"):
        B.encode(B.neigh_replace(9, "100.96.2.0", "0a:58:00"))


def _ack(seq: int, err: int = 0, text: str = "") -> bytes:
    """An NLMSG_ERROR as the kernel sends it with NETLINK_CAP_ACK (+ NETLINK_EXT_ACK when ``text``)."""
    payload = struct.pack("=i", -err) + HDR.pack(16, B.RTM_NEWROUTE, 5, seq, 0)
    flags = 0x100  # NLM_F_CAPPED
    if text:
        t = text.encode() + b"\0"
        payload += B._attr(B.NLMSGERR_ATTR_MSG, t)
        flags |= B.NLM_F_ACK_TLVS
    return HDR.pack(16 + len(payload), B.NLMSG_ERROR, flags, seq, 0) + payload


def test_match_acks_by_sequence_number():
    results = [None] * 4
    pending = {100: 0, 101: 1, 102: 2, 103: 3}
    B.match_acks(pending, _ack(102, errno.EINVAL, "Nexthop has invalid gateway") + _ack(100) + _ack(999), results)
    assert results == [(0, ""), None, (errno.EINVAL, "Nexthop has invalid gateway"), None]
    assert pending == {101: 1, 103: 3}  # the stray ACK (seq 999) matched nothing
    B.match_acks(pending, _ack(103) + _ack(101, errno.ENETUNREACH), results)
    assert results[1] == (errno.ENETUNREACH, "") and results[3] == (0, "") and not pending
    assert B.parse_ack(0, b"\x00") == (errno.EIO, "truncated ACK")


class ScriptedKernel:
    """A fake netlink socket: ``send`` answers each message with an ACK (errno from ``fail`` by position), in
    reverse order and split into two datagrams, or drops the ACKs of ``lose``."""

    def __init__(self, fail=None, lose=()):
        self.fail, self.lose = fail or {}, set(lose)
        self.count = 0
        self.datagrams = []
        self.queue = []

    def send(self, data):
        acks = []
        for mtype, _flags, seq, _payload in B.messages(data):
            if self.count not in self.lose:
                acks.append(_ack(seq, self.fail.get(self.count, 0)))
            self.count += 1
        self.datagrams.append(len(acks))
        acks.reverse()
        half = len(acks) // 2
        self.queue += [x for x in (b"".join(acks[:half]), b"".join(acks[half:])) if x]
        if self.lose:
            self.queue.append(OSError(errno.ENOBUFS, "No buffer space available"))
        return len(data)

    def recv(self, _n):
        if not self.queue:
            raise BlockingIOError
        item = self.queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def test_transact_pipelines_in_windows_and_maps_errors_back():
    reqs = [B.encode(B.neigh_replace(3, f"100.96.{i}.0", "0a:58:00:00:00:01")) for i in range(10)]
    sock = ScriptedKernel(fail={4: errno.EEXIST, 7: errno.ENODEV})
    res = B.transact(sock, reqs, B.SeqCounter(), window=4)
    assert sock.datagrams == [4, 4, 2]  # 3 datagrams for 10 requests, not 10 round trips
    assert [r[0] for r in res] == [0, 0, 0, 0, errno.EEXIST, 0, 0, errno.ENODEV, 0, 0]


def test_transact_lost_acks_are_failures_never_success():
    reqs = [B.encode(B.route_del(f"100.96.{i}.0/24")) for i in range(6)]
    res = B.transact(ScriptedKernel(lose={2, 3}), reqs, B.SeqCounter(), window=6)
    assert [r[0] for r in res] == [0, 0, errno.ENOBUFS, errno.ENOBUFS, 0, 0]


def test_sequence_numbers_wrap_and_skip_zero():
    s = B.SeqCounter()
    s.value = 0xFFFFFF00 - 2
    assert s.take(2) == 0xFFFFFF00 - 2 and s.value == 1


def test_run_staged_rolls_back_only_failed_items():
    calls = []

    def batch(ops):
        calls.append([op.verb for op in ops])
        return [RuntimeError(f"boom {op.args}") if op.args and op.args[0] == "bad" else None for op in ops]

    items = [S.Staged([[B.Op("a", ("x1",))], [B.Op("b", ("x2",))]], [B.Op("undo", ("x",))]),
             S.Staged([[B.Op("a", ("bad",))], [B.Op("b", ("y2",))]], [B.Op("undo", ("y",))]),
             S.Staged([[B.Op("a", ("z1",))], [B.Op("b", ("bad",))]], [B.Op("undo", ("z",))])]
    first, undo_errors = S.run_staged(batch, items, cleanup=[B.Op("cleanup", ("c",))])
    assert calls == [["a", "a", "a"], ["b", "b"], ["undo", "undo", "cleanup"]]
    assert first[0] is None and "bad" in str(first[1]) and "bad" in str(first[2]) and undo_errors == []


def test_apply_serially_and_describe():
    class T:
        def route_del(self, dst, gateway, oif, table):
            raise KeyError(dst)

        def neigh_del(self, ifindex, ip):
            return True

    res = B.apply_serially(T(), [B.route_del("10.0.0.0/8"), B.neigh_del(2, "10.0.0.1")], (KeyError,))
    assert isinstance(res[0], KeyError) and res[1] is None
    assert B.describe(B.route_replace(IPv4Network("100.96.2.0/24"), "100.96.2.0", 4, True), "flannel.1") == \
        "route 100.96.2.0/24 via 100.96.2.0 dev flannel.1 onlink"
    assert B.describe(B.fdb_replace(4, "0a:58:00:00:00:0b", "10.168.0.3"), "flannel.1") == \
        "fdb 0a:58:00:00:00:0b dev flannel.1 dst 10.168.0.3 self permanent"
    assert B.summary([B.neigh_del(1, "10.0.0.1")] * 2 + [B.route_del("10.0.0.0/8")]) == "neigh_del=2 route_del=1"


def test_match_replies_takes_answers_and_errors_by_sequence_number():
    results = [None] * 3
    pending = {7: 0, 8: 1, 9: 2}
    body = B.route_get_request("10.168.1.5")[2]
    answer = B.frame(B.RTM_NEWROUTE, 0, 9, body)
    B.match_replies(pending, answer + _ack(7, errno.ENETUNREACH) + B.frame(B.RTM_NEWROUTE, 0, 55, body), results)
    assert results[0] == (errno.ENETUNREACH, None) and results[1] is None and results[2] == (0, body)
    assert pending == {8: 1}
    r = B.parse_route(results[2][1])
    assert r[1] == bytes([10, 168, 1, 5]) and r[2] == 32
