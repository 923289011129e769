"""The one reading of a boolean setting, for the service (config.py) and the tasks it runs.

Kept apart from config.py so that a built-in task (stage, transfer), which starts once per
request, reads its flags without importing the service's settings, logging and asyncio.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_bool(value: str) -> bool:
    """The one reading of a boolean setting, for the service and the tasks it runs."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r} (use 1/true/yes or 0/false/no)")


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean variable as `parse_bool` reads it; unset or empty means `default`."""
    raw = (os.environ if environ is None else environ).get(name, "")
    try:
        return default if raw.strip() == "" else parse_bool(raw)
    except ValueError as e:
        raise ValueError(f"bad {name}: {e}") from None
