# SPDX-License-Identifier: Apache-2.0
"""Flannel's CNI plugin (fastflannel-cni)."""
