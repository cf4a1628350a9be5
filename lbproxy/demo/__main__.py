"""`python -m lbproxy.demo`: the same command as `lbproxy demo`."""

from __future__ import annotations

import sys

from lbproxy.demo.cli import main

sys.exit(main())
