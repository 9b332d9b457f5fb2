# SPDX-License-Identifier: Apache-2.0
"""The lab: testbed, demo, bench, soak, scale and the ``fastflannel`` command. Imports the product; never imported by it."""
