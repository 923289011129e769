"""1 GiB upload (curl -T) and download (curl -o /dev/null): this tree against another.

    BENCH_OTHER=/path/to/other/checkout .venv/bin/python scripts/bench.d/file_trees.py

Each round starts each tree's service (`python -m batchingest.cli serve`, no processor)
on a fresh root, from a temporary folder so that PYTHONPATH picks the tree, uploads the
same 1 GiB file and downloads it back, the order of the trees alternating round by
round and `sync` plus a second's rest before each upload; reports MiB/s and the
service's CPU seconds per GiB, min / median / max over BENCH_RUNS rounds (default 3).
Without BENCH_OTHER only this tree is measured. Older trees had no `--init` and no
`python -m batchingest`; this starts them the way they all understand.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THIS = str(Path(__file__).resolve().parents[2])
TREES = [t for t in (os.environ.get("BENCH_OTHER"), THIS) if t]
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
TOKEN = "bench-token-0123456789abcdef"
SIZE = 1 << 30
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def curl(*args: str) -> None:
    cmd = ["curl", "-sS", "-f", "-H", f"X-Api-Token: {TOKEN}", *args]
    subprocess.run(cmd, capture_output=True, check=True)


def timed(pid: int, *args: str) -> tuple[float, float]:
    """Wall seconds and service CPU seconds of one curl."""
    c0, t0 = cpu(pid), time.perf_counter()
    curl(*args)
    return time.perf_counter() - t0, cpu(pid) - c0


def one(tree: str, src: Path) -> tuple[float, float, float, float]:
    """Upload MiB/s, its CPU s/GiB, download MiB/s, its CPU s/GiB."""
    work = Path(tempfile.mkdtemp(prefix="bench-trees-"))
    root = work / "root"
    for d in ("data", "queue", "processing", "success", "error", "tasks"):
        (root / d).mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": tree, "BATCHINGEST_TOKENS": TOKEN}
    cmd = [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(root),
           "--port", str(port), "--no-processor"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            try:
                curl("-X", "PUT", f"{url}/jobs/big")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.05)
        subprocess.run(["sync"], check=True)
        time.sleep(1)
        up, up_cpu = timed(proc.pid, "-T", str(src), f"{url}/jobs/big/files/blob")
        down, down_cpu = timed(proc.pid, "-o", "/dev/null", f"{url}/jobs/big/files/blob")
        assert (root / "data" / "big" / "blob").stat().st_size == SIZE
        return SIZE / up / MIB, up_cpu, SIZE / down / MIB, down_cpu
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{min(values):{fmt}} / {statistics.median(values):{fmt}} / {max(values):{fmt}}"


def main() -> None:
    src = Path(tempfile.mkdtemp(prefix="bench-trees-src-")) / "blob"
    with open(src, "wb") as f:
        for _ in range(SIZE // MIB):
            f.write(os.urandom(MIB))
    results: dict[str, list[tuple[float, float, float, float]]] = {t: [] for t in TREES}
    try:
        for r in range(RUNS):
            for tree in TREES if r % 2 == 0 else TREES[::-1]:
                results[tree].append(one(tree, src))
    finally:
        shutil.rmtree(src.parent)
    print("## 1 GiB upload and download by tree (min / median / max)\n")
    print("| tree | upload MiB/s | upload CPU s/GiB | download MiB/s | download CPU s/GiB |")
    print("|---|---|---|---|---|")
    for tree in TREES:
        rows = results[tree]
        cols = [spread([x[i] for x in rows], ".2f" if i % 2 else ",.0f") for i in range(4)]
        print(f"| {'this tree' if tree == THIS else tree} | {' | '.join(cols)} |")


if __name__ == "__main__":
    main()
