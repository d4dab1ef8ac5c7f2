"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM, cleanly and at once.

`fedmed simulate` runs inside `stop_on_signals()`. The first signal is recorded and
raises `Stop` in the main thread, which unwinds whatever it waits in (Flower's
Simulation Engine stops its Ray backend on the way out; a baseline stops training);
code in other threads (the ServerApp's) calls `check()` where it waits, and records
where the run stopped. Later signals are only recorded: the shutdown under way is not
interrupted again, and what the shutdown prints on stderr (Ray's workers saying they
were stopped, Flower's errors about them) is dropped. What the command started and
left running is killed (`end_started`); still within the context, so that a second
signal is only recorded, the command prints its one line (`say`) and exits at once
with 128 + the first signal's number: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals received while stop_on_signals() was active, in order


class Stop(BaseException):
    """Unwinds a run stopped by a signal. A BaseException, as KeyboardInterrupt is: code
    that handles errors (`except Exception`) lets it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


class Interrupted(Exception):
    """A run stopped by a signal: the one line saying where it stopped, and the exit code."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def requested() -> int | None:
    """The first signal received, None if none was."""
    return _received[0] if _received else None


def check() -> None:
    """Raise Stop if a signal asked the run to stop."""
    if _received:
        raise Stop(_received[0])


def record(signum: int) -> bool:
    """A signal that reached the run some other way (`ray.init` installs Ray's own SIGTERM
    handler, which exits instead of calling ours); False outside stop_on_signals()."""
    if _watch is None:
        return False
    if not _received:
        _received.append(signum)
        _watch.stopping()
    return True


def watching() -> bool:
    """Whether signals stop the run (within stop_on_signals(), in the main thread)."""
    return _watch is not None


def take_over() -> None:
    """Install the handler again, where something (`ray.init`) replaced it."""
    if _watch is not None:
        for signum in _watch.taken:
            signal.signal(signum, _watch.handle)


class _Watch:
    def __init__(self, on_stop: Callable[[], None] | None) -> None:
        self.on_stop = on_stop
        self.previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
        self.taken = [signum for signum, handler in self.previous.items() if handler != signal.SIG_IGN]
        self.stderr = sys.stderr
        self.started: dict[int, str] = {}  # the processes below this one when the signal came

    def handle(self, signum: int, frame: object) -> None:
        _received.append(signum)
        if len(_received) == 1:
            self.stopping()
            raise Stop(signum)

    def stopping(self) -> None:
        self.started = _descendants(os.getpid())  # before Ray's shutdown orphans its workers
        if sys.stderr is self.stderr:
            sys.stderr = open(os.devnull, "w")  # closed when the context exits
        if self.on_stop is not None:
            self.on_stop()

    def restore(self) -> None:
        if sys.stderr is not self.stderr:
            muted, sys.stderr = sys.stderr, self.stderr
            muted.close()


_watch: _Watch | None = None


def say(line: str) -> None:
    """Print `line` on the command's own stderr (muted for everything else once stopping)."""
    stream = _watch.stderr if _watch is not None else sys.stderr
    stream.write(line + "\n")
    stream.flush()


def end_started(grace: float) -> None:
    """Kill what this command had started when the signal came (a local Ray's raylet and
    workers) if it is still running `grace` seconds later: a worker stopped under load can
    outlive its raylet by many seconds. Nothing is killed outside stop_on_signals()."""
    if _watch is None:
        return
    deadline = time.monotonic() + grace
    while (alive := [pid for pid, start in _watch.started.items() if _start_time(pid) == start]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone meanwhile
            pass


def _descendants(root: int) -> dict[int, str]:
    """The live processes below `root`, each with its start time (a pid can be reused);
    empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    try:
        entries = [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    except OSError:
        return {}
    for entry in entries:
        fields = _stat(int(entry.name))
        if fields and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            started[int(entry.name)] = fields[19]
    out: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = started[child]
            todo.append(child)
    return out


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: state, ppid, ..., start time (19)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    """The start time of a live (not zombie) process, None if there is none."""
    fields = _stat(pid)
    return fields[19] if fields and fields[0] != "Z" else None


@contextmanager
def stop_on_signals(on_stop: Callable[[], None] | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM stop the run (see the module's note); `on_stop` is called on the
    first, before Stop is raised. Only the main thread takes signals over; a signal the
    command was started ignoring (`nohup`) stays ignored. On exit, the handlers and stderr
    are as they were."""
    global _watch
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _watch = watch = _Watch(on_stop)
    take_over()
    try:
        yield
    finally:
        _watch = None
        _received.clear()
        watch.restore()
        for signum in watch.taken:
            previous = watch.previous[signum]
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
