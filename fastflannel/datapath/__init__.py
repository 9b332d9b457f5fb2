# SPDX-License-Identifier: Apache-2.0
"""The udp backend's data path: the front module, the contract, the Cython extension and its Python twin."""
