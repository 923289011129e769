"""Task resolution and the control file, without the processor around them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from batchingest.runner import UnknownTask, read_control, resolve


def test_tasks_folder_wins_over_a_builtin(tmp_path: Path) -> None:
    assert resolve("stage", tmp_path) == [sys.executable, "-m", "batchingest.tasks.stage"]
    own = tmp_path / "stage"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    assert resolve("stage", tmp_path) == [str(own)]


def test_unknown_invalid_and_not_executable_tasks(tmp_path: Path) -> None:
    with pytest.raises(UnknownTask, match="unknown task nope"):
        resolve("nope", tmp_path)
    with pytest.raises(UnknownTask, match="invalid task name"):
        resolve("../etc/passwd", tmp_path)
    (tmp_path / "plain").write_text("#!/bin/sh\n")
    with pytest.raises(UnknownTask, match="not executable"):
        resolve("plain", tmp_path)


def test_control_lines(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.write_text("addtask:a\n\n  \naddtask:b-2.x\n")
    assert read_control(control) == (["a", "b-2.x"], "")
    control.write_text("addtask:a\naddtask:../x\n")
    added, error = read_control(control)
    assert added == ["a"] and "bad control line 2" in error and "../x" in error
    control.write_text("deltask:a\n")
    assert "bad control line 1" in read_control(control)[1]
    assert read_control(tmp_path / "missing") == ([], "")
