"""Course support: notebook build/check, exercise checks, interactive explorers.

Importing ``bpsim.course`` is light; Jupyter packages are imported only by
the functions that need them.
"""

from __future__ import annotations

__all__ = ["fast", "build", "check", "checks", "widgets"]

import os


def fast() -> bool:
    """True when ``BPSIM_FAST=1``: lessons shrink to tiny settings (CI, nbval)."""
    return os.environ.get("BPSIM_FAST", "") not in ("", "0", "false", "no")


def pick(fast_value, full_value):
    """``fast_value`` under ``BPSIM_FAST=1``, else ``full_value`` (lesson settings)."""
    return fast_value if fast() else full_value
