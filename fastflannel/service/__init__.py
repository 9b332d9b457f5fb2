# SPDX-License-Identifier: Apache-2.0
"""Services beside the daemon: the healthz/readyz listener and Prometheus metrics."""
