# SPDX-License-Identifier: Apache-2.0
from fastflannel.cli import main

raise SystemExit(main())
