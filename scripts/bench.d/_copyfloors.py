"""What the copy benchmarks (staging, transfers) share: sizes, drained timing, floors
run in the same invocation as ours, and the summary lines.

On a shared virtual disk a floor such as `cp -r` swings 20x within a run when the
previous step's writeback is still going. So every timed step starts with the dirty
pages drained (`sync`, then wait until Dirty + Writeback in /proc/meminfo are below
DRAIN_KIB, at most DRAIN_WAIT seconds), floors and ours alternate run by run (the order
rotating, so that none always follows another), and each is reported as min-median-max
with the ratio of medians and the per-run paired ratios. A floor whose max/min exceeds 2
is flagged: its ratio says little. The CPU time of each step is kept too (a floor's: its
processes'; ours: the service's and its tasks', from /proc): it usually moves less with
other people's load than wall time, though on a contended VM the system time of these
page-cache copies grows with the contention too (min against min then says most).

Settings: BENCH_RUNS (runs of each step, default 5), BENCH_SCALE (default 1: one 2 GiB
file and 10,000 files of 4 KiB in 100 folders; 0.1 for a quick check), BENCH_DIR (the
file system, default the temporary folder).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
SCALE = float(os.environ.get("BENCH_SCALE", "1"))
BIG_MIB = max(16, int(2048 * SCALE) // 16 * 16)
FILES = max(100, int(10_000 * SCALE))
FOLDERS = max(1, min(100, FILES // 100))
SMALL = 4096
DRAIN_KIB = 32 << 10  # dirty + under writeback below this: the disk is quiet enough
DRAIN_WAIT = 20.0  # others on the machine may keep writing: give up after this long
SETTLE = 0.2
QUIET_WAIT = 15.0  # after a cleanup: wait at most this long for the disk's discards to stop
QUIET_DISCARDS = 20  # discards per 0.5 s that count as quiet (others delete files too)


def disk_stat(path: Path) -> list[int]:
    """The block device's counters (/sys/.../stat) for the file system holding path; []
    where there are none (a virtual file system, no /sys)."""
    dev = os.stat(path).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def wait_quiet_disk(path: Path) -> float:
    """Wait until the disk has no request in flight and fewer than QUIET_DISCARDS
    discards completed in the last 0.5 s (deleting 10,000 files on a file system mounted
    with `discard` keeps the disk busy well past the sync; others' deletions trickle
    on); at most QUIET_WAIT seconds. Returns the seconds waited."""
    t0 = time.perf_counter()
    window = [disk_stat(path)]
    while len(window[-1]) > 11 and time.perf_counter() - t0 < QUIET_WAIT:
        time.sleep(0.1)
        window = [*window[-4:], disk_stat(path)]  # the last 0.5 s
        # index 8: requests in flight; index 11: discards completed
        if (
            len(window) == 5
            and window[-1][8] == 0
            and (window[-1][11] - window[0][11] < QUIET_DISCARDS)
        ):
            break
    return time.perf_counter() - t0


def dirty_kib() -> int:
    """Dirty + Writeback from /proc/meminfo, in KiB (0 where there is no such file)."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(("Dirty:", "Writeback:")):
                    total += int(line.split()[1])
    except OSError:
        return 0
    return total


@dataclass
class Drains:
    """How the drains before timed steps went: a step started on a busy disk is counted."""

    steps: int = 0
    late: int = 0  # gave up waiting: others kept the disk busy
    waited: float = 0.0
    quiet: float = 0.0  # waited after cleanups for the disk's discards to stop

    def drain(self) -> None:
        t0 = time.perf_counter()
        subprocess.run(["sync"], check=True)
        while dirty_kib() > DRAIN_KIB and time.perf_counter() - t0 < DRAIN_WAIT:
            time.sleep(0.05)
        self.steps += 1
        if dirty_kib() > DRAIN_KIB:
            self.late += 1
        time.sleep(SETTLE)
        self.waited += time.perf_counter() - t0

    def line(self) -> str:
        return (f"{self.steps} timed steps, each after sync and a drain below "
                f"{DRAIN_KIB >> 10} MiB dirty ({self.waited:.0f} s in all); {self.late} "
                f"started above it; {self.quiet:.0f} s waited after cleanups for the disk's "
                "discards to calm down")  # fmt: skip


DRAINS = Drains()


@dataclass
class Timed:
    """One timed step: wall seconds, and CPU seconds (user + system) of what did the work."""

    seconds: float
    cpu: float


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and of its children it has waited for (/proc/PID/stat):
    for the service, its own work and that of the tasks it ran."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields from the state on: utime, stime, cutime, cstime are the 12th to 15th
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_cmd(cmd: list[str]) -> Timed:
    """Seconds a command takes, started on a drained disk, and its CPU time."""
    DRAINS.drain()
    cpu = children_cpu()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return Timed(time.perf_counter() - t0, children_cpu() - cpu)


def cp_sync(src: Path, dst: Path, recursive: bool) -> list[str]:
    """cp then a flush of what it wrote: fsync of the file, or syncfs for a tree."""
    if recursive:
        return ["sh", "-c", 'cp -r "$1" "$2" && sync -f "$2"', "cp", str(src), str(dst)]
    return ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "cp", str(src), str(dst)]


def cp(src: Path, dst: Path, recursive: bool) -> list[str]:
    return ["cp", "-r", str(src), str(dst)] if recursive else ["cp", str(src), str(dst)]


def mmm(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """min / median / max of xs (each times scale)."""
    xs = sorted(x * scale for x in xs)
    return " / ".join(f"{x:.{digits}f}" for x in (xs[0], statistics.median(xs), xs[-1]))


def trees(this: Path, name: str = "this tree") -> dict[str, Path]:
    """This tree, and BENCH_OTHER's (as "BENCH_OTHER") when it is set."""
    found = {name: this}
    if os.environ.get("BENCH_OTHER"):
        found["BENCH_OTHER"] = Path(os.environ["BENCH_OTHER"]).resolve()
    return found


@dataclass
class Series:
    name: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def spread(self) -> float:
        return max(self.seconds) / min(self.seconds)

    def mmm(self, unit: Callable[[float], str]) -> str:
        """min-median-max of the rate (slowest run first)."""
        xs = sorted(self.seconds, reverse=True)
        return " / ".join(unit(x) for x in (xs[0], statistics.median(xs), xs[-1]))

    def cpu_mmm(self) -> str:
        xs = sorted(self.cpu)
        return f"{xs[0]:.2f} / {statistics.median(xs):.2f} / {xs[-1]:.2f} s"


def interleave(
    runs: int, steps: dict[str, Callable[[int], Timed]], cleanup: Callable[[], None]
) -> dict[str, Series]:
    """Run every step once per run, the order rotating by one each run.

    Each step writes where no other does; cleanup removes what a round wrote, once
    before the next round (not before every step: on a disk mounted with `discard`,
    deleting 10,000 files sends the disk work that lasts past the sync), and the disk
    is left to finish that work before the round starts.
    """
    names = list(steps)
    out = {n: Series(n) for n in names}
    for run in range(runs):
        cleanup()
        DRAINS.drain()
        DRAINS.quiet += wait_quiet_disk(Path(os.environ.get("BENCH_DIR") or "/tmp"))
        for i in range(len(names)):
            name = names[(run + i) % len(names)]
            timed = steps[name](run)
            out[name].seconds.append(timed.seconds)
            out[name].cpu.append(timed.cpu)
            print(f"  run {run + 1}/{runs} {name}: {timed.seconds:.3f} s, CPU {timed.cpu:.2f} s",
                  flush=True)  # fmt: skip
    return out


def ratio(floor: Series, ours: Series) -> str:
    """Ours as a fraction of the floor's speed: the ratio of medians, then run by run."""
    med = statistics.median(floor.seconds) / statistics.median(ours.seconds)
    paired = sorted(f / o for f, o in zip(floor.seconds, ours.seconds, strict=True))
    return f"{med:.2f}x (runs {paired[0]:.2f}/{statistics.median(paired):.2f}/{paired[-1]:.2f})"


def cpu_ratio(floor: Series, ours: Series) -> str:
    """Our CPU time as a multiple of the floor's: medians, then run by run."""
    med = statistics.median(ours.cpu) / max(statistics.median(floor.cpu), 1e-3)
    paired = sorted(o / max(f, 1e-3) for f, o in zip(floor.cpu, ours.cpu, strict=True))
    return f"{med:.2f}x (runs {paired[0]:.2f}/{statistics.median(paired):.2f}/{paired[-1]:.2f})"


def table(
    title: str, unit: Callable[[float], str], ours: Series, floors: list[tuple[Series, str]]
) -> list[str]:
    """Markdown rows: ours, then each floor with our ratio to it and its target; then the
    CPU time of each, ours as a multiple of the floor's."""
    rows = [f"| {title}: {ours.name} | {ours.mmm(unit)} | | | CPU {ours.cpu_mmm()} | |"]
    warnings = []
    for floor, target in floors:
        rows.append(f"| {title}: {floor.name} | {floor.mmm(unit)} | {ratio(floor, ours)} | "
                    f"{target} | CPU {floor.cpu_mmm()} | {cpu_ratio(floor, ours)} |")  # fmt: skip
        if floor.spread() > 2:
            warnings.append(f"WARNING: {title}, floor {floor.name} spread {floor.spread():.1f}x "
                            "(max/min > 2): its ratio says little")  # fmt: skip
    return rows + warnings


def header() -> list[str]:
    return [
        "| workload: what | min / median / max | ours vs it: medians (per-run min/median/max) "
        "| target | CPU min / median / max | our CPU / its CPU: medians (per run) |",
        "|---|---|---|---|---|---|",
    ]


def gib_per_s(mib: int) -> Callable[[float], str]:
    return lambda s: f"{mib / 1024 / s:.2f}"


def files_per_s(n: int) -> Callable[[float], str]:
    return lambda s: f"{n / s:,.0f}"


def make_big(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 << 20)
    with open(path, "wb") as f:
        for _ in range(BIG_MIB // 16):
            f.write(block)


def make_tree(top: Path) -> list[str]:
    """FILES files of SMALL bytes in FOLDERS folders; their paths relative to top's parent."""
    rels = []
    for i in range(FILES):
        folder = top / f"d{i % FOLDERS:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:05d}.dat").write_bytes(os.urandom(SMALL))
        rels.append(f"{top.name}/d{i % FOLDERS:03d}/f{i:05d}.dat")
    return rels
