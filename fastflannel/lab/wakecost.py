# SPDX-License-Identifier: Apache-2.0
"""What waking a sleeping thread costs on this machine (issue 12's ping latency): a UDP echo between two hosts.

``python -m fastflannel.lab.wakecost`` brings up a 2-host testbed (no daemons) and measures, one datagram every
10 ms as ``ping -i 0.01`` does, the round trip of a 64-byte UDP echo from h1 to h2 in four placements: client and
server on the same CPU or on different ones, the server sleeping in ``recvfrom`` or spinning on a non-blocking
socket. The client always sleeps in ``recv`` for the answer. Against it: the kernel's own ``ping`` between the
same hosts, whose echo is answered in softirq on the sender's CPU (no thread wakes). The difference between the
placements is the price of a wake-up across CPUs (an IPI to a halted vCPU in a VM) that every sleeping forwarder
pays per crossing; the udp backend's ping round trip has four such crossings, VXLAN's none.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from typing import Dict, List

PORT = 5411
SERVER = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',int(sys.argv[1])))\n"
    "spin=sys.argv[2]=='spin'\n"
    "if spin: s.setblocking(False)\n"
    "print('ready',flush=True)\n"
    "while True:\n"
    "    try: d,a=s.recvfrom(2048)\n"
    "    except BlockingIOError: continue\n"
    "    s.sendto(d,a)\n"
)
CLIENT = (
    "import socket,sys,time\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.connect((sys.argv[1],int(sys.argv[2])));s.settimeout(2)\n"
    "r=[]\n"
    "for i in range(int(sys.argv[3])):\n"
    "    t=time.perf_counter();s.send(b'x'*64);s.recv(2048);r.append((time.perf_counter()-t)*1e6);time.sleep(0.01)\n"
    "r.sort();print(r[len(r)//2],r[int(len(r)*0.99)])\n"
)
PLACEMENTS = (("same CPU, server sleeps", "0", "0", "sleep"), ("other CPU, server sleeps", "0", "1", "sleep"),
              ("same CPU, server spins", "0", "0", "spin"), ("other CPU, server spins", "0", "1", "spin"))


def main(argv=None) -> int:
    from fastflannel.lab.measure import ping_rtt
    from fastflannel.lab.testbed import Testbed

    ap = argparse.ArgumentParser(prog="python -m fastflannel.lab.wakecost", description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300, help="echoes per placement and round")
    ap.add_argument("--reps", type=int, default=3)
    ns = ap.parse_args(argv)
    res: Dict[str, List[tuple]] = {p[0]: [] for p in PLACEMENTS}
    res["kernel ping (no wake-up)"] = []
    with contextlib.ExitStack() as stack:  # the testbed (and every process it started) goes on every path
        tb = stack.enter_context(Testbed(2))
        h1, h2 = tb.hosts
        for rep in range(ns.reps):
            r = ping_rtt(h1, h2.ip, count=ns.count, interval=0.01, timeout=max(10.0, ns.count * 0.05))
            res["kernel ping (no wake-up)"].append((r.p50 * 1000, r.p99 * 1000))
            for name, ccpu, scpu, mode in PLACEMENTS:
                srv = h2.popen(["taskset", "-c", scpu, sys.executable, "-c", SERVER, str(PORT), mode],
                               stdout=subprocess.PIPE, text=True)
                try:
                    assert srv.stdout is not None and "ready" in srv.stdout.readline()
                    out = h1.run(["taskset", "-c", ccpu, sys.executable, "-c", CLIENT, str(h2.ip), str(PORT),
                                  str(ns.count)], timeout=ns.count * 0.05 + 30).stdout.split()
                    res[name].append((float(out[0]), float(out[1])))
                finally:
                    srv.kill()
                    srv.wait(5)
                time.sleep(0.2)
            print(f"round {rep + 1}: " + "; ".join(f"{k} p50 {v[-1][0]:.0f} us" for k, v in res.items()), flush=True)
    print("\nround trip, us (medians of the rounds)      p50      p99")
    for k, v in res.items():
        print(f"  {k:40s} {statistics.median(x[0] for x in v):8.0f} {statistics.median(x[1] for x in v):8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
