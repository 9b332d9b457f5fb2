# SPDX-License-Identifier: Apache-2.0
"""The kernel layer: netlink (the only pyroute2 importer), interface selection, TUN, iptables, sysctl."""
