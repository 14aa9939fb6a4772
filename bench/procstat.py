"""CPU time and memory of processes, read from /proc (Linux only).

CPU is utime + stime of the process itself (its threads included, reaped children
excluded), so the server's figure never contains its nats-server child; use
:func:`tree_cpu_s` where a process's live descendants belong to it (a worker that
spawns processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    cpu_s: float  # utime + stime of the process itself


def stat(pid: int) -> Stat | None:
    """The process's /proc stat, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm is in parentheses and may itself contain spaces or parentheses.
    head, _, tail = raw.rpartition(")")
    comm = head.split("(", 1)[1]
    fields = tail.split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return Stat(
        pid=pid,
        comm=comm,
        state=fields[0],
        ppid=int(fields[1]),
        cpu_s=(int(fields[11]) + int(fields[12])) / CLK_TCK,
    )


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    s = stat(pid)
    return s is not None and s.state not in ("Z", "X")


def cpu_s(pid: int) -> float:
    """utime + stime of the process itself in seconds (0 once it is gone)."""
    s = stat(pid)
    return s.cpu_s if s else 0.0


def children(pid: int) -> list[Stat]:
    """The live direct children of a process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        s = stat(int(entry.name))
        if s is not None and s.ppid == pid:
            found.append(s)
    return found


def descendants(pid: int) -> list[int]:
    """The process and its live descendants."""
    pids = [pid]
    i = 0
    while i < len(pids):
        pids.extend(c.pid for c in children(pids[i]))
        i += 1
    return pids


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    return sum(cpu_s(p) for p in descendants(pid))


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB: the resident set now and its peak; (0, 0) once gone."""
    rss = hwm = 0
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def tree_memory_kb(pid: int) -> tuple[int, int]:
    """Sum of (VmRSS, VmHWM) over a process and its live descendants."""
    rss = hwm = 0
    for p in descendants(pid):
        r, h = memory_kb(p)
        rss += r
        hwm += h
    return rss, hwm


def named_cpu_s(comm: str) -> dict[int, float]:
    """CPU seconds of every live process called ``comm`` (e.g. each PostgreSQL backend),
    by pid: compare two readings pid by pid, a process new in the second counting whole."""
    out: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            s = stat(int(entry.name))
            if s is not None and s.comm == comm:
                out[s.pid] = s.cpu_s
    return out


def named_cpu_delta_s(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU the processes of two :func:`named_cpu_s` readings used in between (processes
    that exited meanwhile are not seen)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
