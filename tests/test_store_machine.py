"""A state machine over a real jobs root: the store never loses, duplicates or overwrites a job.

Every job gets a unique token file when it is made; the model knows each job's state and
name (a finished job may have been renamed NAME-NNN). After every step the folders on
disk must hold exactly the model's jobs, each once, each with its own token.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from batchingest.store import (
    FINAL_STATES,
    STATES,
    Hold,
    JobBusy,
    JobNotFound,
    Store,
    rename_noreplace,
)

# few names, so that jobs collide; one long enough that NAME-NNN must be shortened
NAMES = ["a", "a-001", "x" * 253]
names = st.sampled_from(NAMES)
TOKEN = ".token"  # hidden: the service never looks at it, the test always does


@dataclass
class ModelJob:
    state: str
    name: str


def final_name(name: str, taken: set[str]) -> str:
    """The first free name in a final state: NAME, then NAME-001, NAME-002, ..."""
    if name not in taken:
        return name
    for i in itertools.count(1):
        suffix = f"-{i:03d}"
        candidate = name[: 255 - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="store-machine-"))
        self.store = Store(self.tmp / "root")
        self.store.init()
        self.jobs: dict[str, ModelJob] = {}  # token -> job
        self.holds: dict[str, tuple[str, Hold]] = {}  # name in processing/ -> (token, hold)
        self.tokens = (f"job-{i}" for i in itertools.count())

    def teardown(self) -> None:
        for _, hold in self.holds.values():
            hold.release()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the model -----------------------------------------------------------------

    def named(self, name: str) -> list[tuple[str, ModelJob]]:
        return [(t, j) for t, j in self.jobs.items() if j.name == name]

    def model_find(self, name: str) -> tuple[str, ModelJob] | None:
        """What Store.find sees when one name sits in several states: the first in STATES."""
        found = self.named(name)
        found.sort(key=lambda tj: STATES.index(tj[1].state))
        return found[0] if found else None

    def in_state(self, state: str) -> set[str]:
        return {j.name for j in self.jobs.values() if j.state == state}

    def new_token(self, path: Path) -> str:
        token = next(self.tokens)
        (path / TOKEN).write_text(token)
        return token

    # -- rules ----------------------------------------------------------------------

    @rule(name=names)
    def create(self, name: str) -> None:
        existing = self.model_find(name)
        job, created = self.store.create(name)
        if existing is None:
            assert created and job.state == "data"
            self.jobs[self.new_token(job.path)] = ModelJob("data", name)
        else:
            assert not created and job.state == existing[1].state

    @rule(name=names)
    def drop_into_queue(self, name: str) -> None:
        """An operator builds a job under a hidden name and moves it into queue/ (mv -n)."""
        build = self.store.root / "queue" / f".build-{name[:20]}"
        build.mkdir()
        token = self.new_token(build)
        try:
            rename_noreplace(build, self.store.root / "queue" / name)
        except FileExistsError:
            assert name in self.in_state("queue")
            shutil.rmtree(build)
            return
        assert name not in self.in_state("queue")
        self.jobs[token] = ModelJob("queue", name)

    @rule(name=names)
    def queue(self, name: str) -> None:
        found = self.model_find(name)
        if found is None:
            with pytest.raises(JobNotFound):
                self.store.queue(name)
            return
        _, mj = found
        job, moved = self.store.queue(name)
        if mj.state in ("queue", "processing") or name in self.in_state("queue"):
            assert not moved
        else:
            assert moved and job.state == "queue"
            mj.state = "queue"

    @rule(name=names)
    def claim(self, name: str) -> None:
        waiting = [t for t, j in self.named(name) if j.state == "queue"]
        hold = self.store.claim(name)
        if not waiting or name in self.in_state("processing"):
            assert hold is None
            return
        assert hold is not None
        (token,) = waiting
        self.jobs[token].state = "processing"
        self.holds[name] = (token, hold)

    @rule(name=names, final=st.sampled_from(FINAL_STATES))
    def process(self, name: str, final: str) -> None:
        """Claim a job and run it to the end in one step, as a processor does."""
        self.claim(name)
        if name in self.holds:
            self.finish_hold(name, final)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), final=st.sampled_from(FINAL_STATES))
    def finish(self, data: st.DataObject, final: str) -> None:
        self.finish_hold(data.draw(st.sampled_from(sorted(self.holds))), final)

    def finish_hold(self, name: str, final: str) -> None:
        token, hold = self.holds.pop(name)
        expected = final_name(name, self.in_state(final))
        job = self.store.finish(hold, final)
        assert (job.state, job.name) == (final, expected)
        if expected != name:
            event("finished job renamed NAME-NNN")
        self.jobs[token] = ModelJob(final, expected)

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def processor_dies(self, data: st.DataObject) -> None:
        """A holder goes away without finishing; recover() puts its job back in queue/."""
        name = data.draw(st.sampled_from(sorted(self.holds)))
        _, hold = self.holds.pop(name)
        hold.release()
        self.recover()

    @rule()
    def recover(self) -> None:
        orphans = {
            j.name
            for j in self.jobs.values()
            if j.state == "processing" and j.name not in self.holds
        }
        expected = sorted(orphans - self.in_state("queue"))
        assert sorted(self.store.recover()) == expected
        for j in self.jobs.values():
            if j.state == "processing" and j.name in expected:
                j.state = "queue"

    @rule(name=names)
    def delete(self, name: str) -> None:
        found = self.model_find(name)
        if found is None:
            assert self.store.delete(name) is False
            return
        token, mj = found
        if mj.state == "processing":
            with pytest.raises(JobBusy):
                self.store.delete(name)
            return
        assert self.store.delete(name) is True
        del self.jobs[token]

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def disk_matches_model(self) -> None:
        on_disk = sorted((j.state, j.name) for j in self.store.list())
        assert on_disk == sorted((j.state, j.name) for j in self.jobs.values())

    @invariant()
    def every_job_once_with_its_own_token(self) -> None:
        seen: Counter[str] = Counter()
        for job in self.store.list():
            seen[(job.path / TOKEN).read_text()] += 1
        # never lost, never in two states, never overwritten by another job
        assert seen == Counter(self.jobs.keys())
        for token, j in self.jobs.items():
            path = self.store.root / j.state / j.name / TOKEN
            assert path.read_text() == token

    @invariant()
    def nothing_half_deleted(self) -> None:
        trash = self.store.root / ".trash"
        assert not trash.exists() or list(trash.iterdir()) == []


StoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase
