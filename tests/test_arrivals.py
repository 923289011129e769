"""The inotify watch of queue/: arrivals wake, departures do not."""

from __future__ import annotations

import os
from pathlib import Path

from batchingest.arrivals import Arrivals


def test_arrivals_are_told_and_departures_are_not(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    (tmp_path / ".j1").mkdir()
    watch = Arrivals(queue)
    try:
        assert watch.drain() is False  # nothing yet
        os.rename(tmp_path / ".j1", queue / "j1")  # moved in: the usual arrival
        (queue / "j2").mkdir()  # made in place
        assert watch.drain() is True
        assert watch.drain() is False  # one read took both
        os.rename(queue / "j1", tmp_path / "processing-j1")  # a claim: no wake
        os.rmdir(queue / "j2")
        assert watch.drain() is False
        assert watch.gone is False
    finally:
        watch.close()
    assert watch.fd == -1


def test_a_removed_folder_is_told_as_gone(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    watch = Arrivals(queue)
    try:
        os.rename(queue, tmp_path / "elsewhere")
        watch.drain()
        assert watch.gone is True
    finally:
        watch.close()


def test_a_link_is_not_watched(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    try:
        Arrivals(tmp_path / "link")
    except OSError:
        pass
    else:
        raise AssertionError("a link to a folder was watched")
