"""What the benchmarks share, and the test fixtures with them.

- numbers: percentiles and latency summaries, formatting, dotted-path lookups in results;
- output: one console, progress bars, JSON result files stamped with the machine and commit;
- processes: CPU and memory of processes from /proc (and of the whole machine);
- child processes: the environment that carries a ``Settings`` to a child, a ``tailbridge
  worker`` (or any command) in its own process group, waiting until a predicate holds;
- the stack: free loopback ports, and ``tailbridge stack up | down | status`` run through the
  CLI (benchmarks never import the launcher, ``tailbridge.infra``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tailbridge.settings import Settings

ROOT = Path(__file__).resolve().parent.parent  # the repository (for the git commit stamp)
CLI = str(Path(sys.executable).parent / "tailbridge")
console = Console(width=None if sys.stdout.isatty() else 160)
# Library deprecation notices (kafka-python, Feast) are for their maintainers, not for readers of a result.
warnings.filterwarnings("ignore", category=DeprecationWarning)


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says why (and shows a log tail)."""


class TimedOut(BenchError, AssertionError):
    """A wait ran out of time (in a test, an assertion that did not come true in time)."""


class WorkerExited(BenchError):
    pass


# ------------------------------------------------------------------ numbers


def pct(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def latency_summary(ms: list[float]) -> dict:
    """Count, p50 / p90 / p95 / p99, max and mean of latencies in milliseconds (None when empty)."""
    return {"count": len(ms), **{f"p{q}_ms": pct(ms, q) for q in (50, 90, 95, 99)},
            "max_ms": max(ms) if ms else None, "mean_ms": statistics.fmean(ms) if ms else None}


def fmt(value, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def get(d: Any, path: str):
    """``get(result, "freshness.probes.p99_ms")``: None where any part is missing."""
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


# ------------------------------------------------------------------ output


def progress_bar() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_version(paths: Iterable[str] = ()) -> dict:
    """The commit, and whether the code under ``paths`` differs from it: numbers describe the
    code on disk when the measured processes started."""
    import hashlib

    diff = _git("diff", "HEAD", "--", *paths)
    return {"commit": _git("rev-parse", "HEAD"), "uncommitted_changes": bool(diff),
            "uncommitted_files": _git("diff", "HEAD", "--name-only", "--", *paths).splitlines(),
            "diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None}


def run_meta(**extra) -> dict:
    """When and where a benchmark ran: host, CPUs, Python, load average, commit."""
    return {"started": datetime.now(UTC).isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg(), "commit": _git("rev-parse", "HEAD"),
            **extra}


def loadavg_text(values: Iterable[float] | None = None) -> str:
    return " ".join(f"{x:.2f}" for x in (values or os.getloadavg()))


def simulation_parser(doc: str, items: int, users: int, sessions: int, out: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark on demo data with a simulated log, made in process: its
    sizes, seed, threads, where it keeps what it builds, the JSON file and ``--smoke``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--items", type=int, default=items)
    parser.add_argument("--users", type=int, default=users)
    parser.add_argument("--sessions", type=int, default=sessions)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmark works, no measurement")
    return parser


def exit_on_sigterm() -> None:
    """SIGTERM ends the benchmark as Ctrl-C does: through its ``finally`` blocks, which stop the
    workers and the stack it started (they run in process groups of their own)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(payload, default=str, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                                  | orjson.OPT_NON_STR_KEYS))
    console.print(f"wrote {path}")


# ------------------------------------------------------------------ processes, from /proc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (its threads included), in clock ticks; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


def machine_busy_ticks() -> int:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values[:8]) - values[3] - (values[4] if len(values) > 4 else 0)  # all but idle + iowait


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def descendants(pid: int) -> list[int]:
    """The process and all its descendants."""
    children: dict[int, list[int]] = {}
    for child in _pids():
        try:
            ppid = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(child)
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def memory_of(pid: int | None, tree: bool = True) -> dict | None:
    """VmHWM (peak) and VmRSS (now) of a process and its descendants, in MiB. For a tree the
    peak is the sum of each process's own peak (an upper bound)."""
    if pid is None or not Path(f"/proc/{pid}").exists():
        return None
    pids = descendants(pid) if tree else [pid]
    stats = [_status_kib(p) for p in pids]
    return {"pid": pid, "processes": len(pids),
            "peak_mib": round(sum(s.get("VmHWM", 0) for s in stats) / 1024, 1),
            "rss_mib": round(sum(s.get("VmRSS", 0) for s in stats) / 1024, 1)}


def listening_pid(port: int) -> int | None:
    """The process listening on a TCP port, from /proc/net/tcp{,6} and /proc/*/fd."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    targets = {f"socket:[{inode}]" for inode in inodes}
    for pid in _pids() if targets else []:
        try:
            if any(os.readlink(fd) in targets for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return pid
        except OSError:
            continue
    return None


class CpuWindow:
    """Cores used over a window by each named process (with its descendants, except the names
    in ``alone``) and each group of processes (added up), by the whole machine, and by
    everything else ("others"); ``parts`` are shown as well but already counted in a group;
    optionally the busiest of the others. On a shared machine this shows what a measurement
    competed with."""

    def __init__(self, pids: Mapping[str, int | None], alone: Iterable[str] = ("bench",), top_others: int = 0,
                 groups: Mapping[str, Iterable[int | None]] | None = None, parts: Mapping[str, int | None] | None = None):
        self.pids = {name: [pid] for name, pid in pids.items() if pid}
        self.pids |= {name: [pid for pid in group if pid] for name, group in (groups or {}).items()}
        self.parts = {name: [pid] for name, pid in (parts or {}).items() if pid}
        self.alone, self.top_others = set(alone), top_others
        self.start()

    def _tree(self, name: str, pids: list[int]) -> list[int]:
        return pids if name in self.alone else [p for pid in pids for p in descendants(pid)]

    def _ticks(self) -> tuple[dict[str, int], dict[int, int]]:
        every = {pid: cpu_ticks(pid) for pid in _pids()} if self.top_others else {}
        tick = lambda pid: every[pid] if pid in every else cpu_ticks(pid)  # noqa: E731
        named = {name: sum(tick(p) for p in self._tree(name, pids)) for name, pids in (self.pids | self.parts).items()}
        return named, every

    def start(self) -> None:
        self.t0, (self.named0, self.every0), self.machine0 = time.monotonic(), self._ticks(), machine_busy_ticks()

    def snapshot(self) -> tuple[float, dict[str, int], int]:
        """The counters now, for ``between`` (a window whose start is chosen afterwards)."""
        return time.monotonic(), self._ticks()[0], machine_busy_ticks()

    def between(self, first: tuple[float, dict[str, int], int], last: tuple[float, dict[str, int], int]) -> dict:
        return self._cores(last[0] - first[0], first[1], last[1], first[2], last[2])

    def stop(self) -> dict[str, Any]:
        now, (named, every), busy = time.monotonic(), self._ticks(), machine_busy_ticks()
        out = self._cores(now - self.t0, self.named0, named, self.machine0, busy)
        if self.top_others:
            cores = lambda t, before: max(t - before, 0) / CLOCK_TICKS / max(now - self.t0, 1e-9)  # noqa: E731
            counted = {p for name, pids in self.pids.items() for p in self._tree(name, pids)}
            busiest = sorted(((cores(t, self.every0[pid]), pid) for pid, t in every.items()
                              if pid not in counted and pid in self.every0), reverse=True)[:self.top_others]
            out["top_others"] = [f"{c:.2f} {' '.join(cmdline(pid))[:70] or pid}" for c, pid in busiest if c >= 0.05]
        return out

    def _cores(self, wall: float, named0: dict[str, int], named: dict[str, int], busy0: int, busy: int) -> dict:
        wall = max(wall, 1e-9)
        cores = lambda now, before: max(now - before, 0) / CLOCK_TICKS / wall  # noqa: E731
        out: dict[str, Any] = {name: round(cores(named[name], named0.get(name, 0)), 2) for name in named}
        ours = sum(out[name] for name in self.pids)
        out["machine"] = round(cores(busy, busy0), 2)
        out["others"] = round(max(out["machine"] - ours, 0.0), 2)
        out["window_s"] = round(wall, 2)
        return out


# ------------------------------------------------------------------ child processes

SETTINGS_VARS = {f"TAILBRIDGE_{name.upper()}" for name in Settings.model_fields}


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a child process (the CLI, a worker, a second client) that must see
    exactly these settings: this process's environment without its own TAILBRIDGE_* settings
    variables, plus ``settings.as_env()``. A field that is None is absent (the child takes
    the default) rather than the string "None", which the child would refuse."""
    inherited = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_VARS}
    return inherited | settings.as_env() | extra


REPORT_LINE = re.compile(r"last \d+ s: .*")  # the worker's periodic counts


class Worker:
    """``tailbridge worker`` (or another command, ``argv``) with the settings' environment, in
    its own process group, logging to ``log_path`` and run from that file's directory."""

    def __init__(self, settings: Settings, log_path: Path, argv: list[str] | None = None,
                 env: Mapping[str, str] | None = None, threads: int | None = 1):
        self.settings, self.log_path = settings, Path(log_path)
        self.argv = argv or [CLI, "worker"]
        self.name = " ".join([Path(self.argv[0]).name, *self.argv[1:3]])
        # One torch/OpenMP thread by default, as a worker beside others runs; None: the library default.
        threads_env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        self.extra_env = {"TOKENIZERS_PARALLELISM": "false", **threads_env, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.final_memory: dict | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = settings_env(self.settings, **self.extra_env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=env, cwd=self.log_path.parent, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise WorkerExited(f"{self.name} exited with code {self.proc.returncode}\n"
                               f"--- log tail ({self.log_path}) ---\n{self.log_tail()}")

    def memory(self) -> dict | None:
        return memory_of(self.proc.pid) if self.running() else None

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the group (SIGKILL after ``timeout``); notes the memory it had."""
        if not self.running():
            return
        self.final_memory = self.memory()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def log_summary(self) -> dict:
        """Retries, tracebacks, errors and the last periodic reports in the log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        lines = text.splitlines()
        problem = lambda line: ("Traceback" in line or "failed; retrying" in line or " ERROR " in line  # noqa: E731
                                or line.startswith("ERROR") or "[E]" in line)
        return {
            "log": str(self.log_path),
            "retries": sum("failed; retrying" in line for line in lines),
            "tracebacks": text.count("Traceback (most recent call last)"),
            "errors": sum(" ERROR " in line or line.startswith("ERROR") or "[E]" in line for line in lines),
            "dead_lettered": sum("dead-lettered" in line for line in lines),
            "overlapping_timers": sum("is overlapping" in line for line in lines),
            "reports": [m.group(0) for line in lines if (m := REPORT_LINE.search(line))][-4:],
            "first_problem": next((line for line in lines if problem(line)), None),
        }


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25,
               worker: Worker | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that. Raises TimedOut
    after ``timeout`` seconds, or WorkerExited as soon as ``worker`` (when given) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if worker is not None:
            worker.check_alive()
        if time.monotonic() >= deadline:
            tail = f"\n--- log tail ({worker.log_path}) ---\n{worker.log_tail()}" if worker else ""
            raise TimedOut(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(interval)


# ------------------------------------------------------------------ the stack, through the CLI


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tailbridge(settings: Settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``tailbridge ARGS`` with the settings' environment; output captured."""
    return subprocess.run([CLI, *args], env=settings_env(settings), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _statuses(out: subprocess.CompletedProcess) -> list[dict]:
    line = next((line for line in reversed(out.stdout.splitlines()) if line.startswith("[")), None)
    if line is None:
        raise BenchError(f"`tailbridge {' '.join(out.args[1:])}` exited {out.returncode} without a JSON status:\n"
                         f"{(out.stdout + out.stderr)[-2000:]}")
    return orjson.loads(line)


def stack_up(settings: Settings) -> list[dict]:
    """``tailbridge stack up --json``: each component's name, address, mode, healthy, pid, detail."""
    out = tailbridge(settings, "stack", "up", "--json")
    if out.returncode != 0:
        raise BenchError(f"`tailbridge stack up` failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return _statuses(out)


def stack_status(settings: Settings) -> list[dict]:
    """``tailbridge stack status --json`` (components that are down say so: healthy false)."""
    return _statuses(tailbridge(settings, "stack", "status", "--json", timeout=120))


def stack_down(settings: Settings) -> str:
    """``tailbridge stack down``: stops only what ``stack up`` started for these settings."""
    out = tailbridge(settings, "stack", "down", timeout=120)
    return (out.stdout + out.stderr).strip()


def stack_pids(statuses: list[dict]) -> dict[str, int | None]:
    """The processes of the components `stack up` started (external ones have none)."""
    return {s["name"]: s["pid"] if s["mode"] == "embedded" else None for s in statuses}
