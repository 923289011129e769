"""Run a command so that file modes apply to it, for tests of folders with search but
no read permission (0711) or none at all.

Root passes every mode check (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): as root the
command runs through setpriv without those two capabilities, still as root (so it can
reach the test's own tmp_path); without setpriv the test is skipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import pytest

_DAC = "-dac_override,-dac_read_search"


def unprivileged(argv: Sequence[str]) -> list[str]:
    """argv, prefixed so that modes apply to it (see the module's docstring)."""
    if os.geteuid() != 0:
        return list(argv)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file modes would not apply")
    return [setpriv, f"--inh-caps={_DAC}", f"--bounding-set={_DAC}", "--", *argv]
