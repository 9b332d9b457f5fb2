# SPDX-License-Identifier: Apache-2.0
"""fastflannel: a Flannel-compatible overlay network daemon with a Cython data path."""

__version__ = "0.1.0"
