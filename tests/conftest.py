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


def as_shared(store: Store) -> Store:
    """The store as on a shared file system (NFS, FUSE): a `.lock` file and a lease for
    every held job, whatever file system the test's root is on."""
    store.folder_locks = False
    store.leases = True
    return store


@pytest.fixture
def shared_fs_store(root: Path) -> Store:
    return as_shared(Store(root))
