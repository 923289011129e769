from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from batchingest.store import Store


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    Store(r).init()
    (r / "tasks").mkdir()
    return r


@pytest.fixture
def store(root: Path) -> Store:
    return Store(root)
