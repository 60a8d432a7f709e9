"""Counting kernel events (system calls, FUSE requests) with tracepoints.

strace stops the traced thread at every call, which slows the daemon so
much that the timing the tests look at (is the next request already queued
when the last reply is out?) is not the one it has untraced. A tracepoint
costs the thread almost nothing. The events go to a tracing instance of our
own (other tracing on the machine is left alone), filtered as asked; tracefs
is mounted privately where the machine has it nowhere. The bench counts FUSE
requests the same way (benchmarks/realwork.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator


class EventCounter:
    """Events of a tracing instance of our own, counted by the keys *keys*
    finds in their lines. *events*: "group/event" -> filter. The events wait
    in the instance's buffer until counts() drains it; a buffer that overran
    makes the counts unavailable rather than wrong."""

    def __init__(
        self,
        events: dict[str, str],
        keys: Callable[[bytes], list[str]],
        *,
        buffer_kib: int = 8192,
        name: str = "strata",
    ) -> None:
        self._events, self._keys, self._buffer_kib = events, keys, buffer_kib
        self._name = f"{name}-{os.getpid()}"
        self._own_tracefs: str | None = None
        self._instance: str | None = None
        self._pipe: int | None = None
        self._rest = b""
        self._found: dict[str, int] = {}

    def __enter__(self) -> EventCounter:
        """Start tracing; an OSError (no tracefs, no such event) leaves nothing behind."""
        try:
            instance = os.path.join(self._tracefs(), "instances", self._name)
            os.mkdir(instance)
            self._instance = instance
            settings = [(os.path.join(instance, "buffer_size_kb"), str(self._buffer_kib))]
            for event, condition in self._events.items():
                path = os.path.join(instance, "events", event)
                settings += [(os.path.join(path, "filter"), condition),
                             (os.path.join(path, "enable"), "1")]  # fmt: skip
            for name, value in settings:
                with open(name, "w") as handle:
                    handle.write(value)
            pipe = os.path.join(instance, "trace_pipe")
            self._pipe = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self._cleanup()
            raise
        return self

    def _tracefs(self) -> str:
        with open("/proc/self/mounts") as handle:
            for line in handle:
                fields = line.split()
                if fields[2] == "tracefs":
                    return fields[1]
        self._own_tracefs = tempfile.mkdtemp(prefix="strata-tracefs-")
        subprocess.run(["mount", "-t", "tracefs", "nodev", self._own_tracefs], check=True)
        return self._own_tracefs

    def counts(self) -> dict[str, int] | None:
        """Events so far by key; None if the buffer overran (or none)."""
        if self._pipe is None or self._instance is None:
            return None
        while True:
            try:
                chunk = os.read(self._pipe, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            lines = (self._rest + chunk).split(b"\n")
            self._rest = lines.pop()
            for key in self._keys(b"\n".join(lines)):
                self._found[key] = self._found.get(key, 0) + 1
        for cpu in os.listdir(os.path.join(self._instance, "per_cpu")):
            with open(os.path.join(self._instance, "per_cpu", cpu, "stats")) as handle:
                if re.search(r"^overrun: [1-9]", handle.read(), re.M):
                    return None
        return dict(self._found)

    def __exit__(self, *exc: object) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self._instance is not None:
            # Removing the instance disables its events and frees its buffer.
            with contextlib.suppress(OSError):
                os.rmdir(self._instance)
            self._instance = None
        own, self._own_tracefs = self._own_tracefs, None
        if own is not None:
            if subprocess.run(["mountpoint", "-q", own]).returncode == 0:
                subprocess.run(["umount", own], check=False)
            os.rmdir(own)


def _syscall_keys(text: bytes) -> list[str]:
    # An entry shows as "sys_NAME(arguments)", an exit as "sys_NAME -> value".
    return [
        f"sys_{'exit' if kind == b' ->' else 'enter'}_{name.decode()}"
        for name, kind in re.findall(rb": sys_(\w+)( ->|\()", text)
    ]


class SyscallCounts:
    """Calls of each traced event so far (read them inside the block)."""

    def __init__(self, counter: EventCounter) -> None:
        self._counter = counter

    def counts(self) -> dict[str, int]:
        found = self._counter.counts()
        assert found is not None, "the trace buffer overran"
        return found


@contextlib.contextmanager
def syscalls_of(tid: int, events: dict[str, str]) -> Iterator[SyscallCounts]:
    """Trace *events* (e.g. {"sys_enter_ppoll": "", "sys_exit_ppoll": "ret == 0"}:
    name -> extra filter) of thread *tid* while the block runs."""
    filters = {
        f"syscalls/{event}": f"common_pid == {tid}" + (f" && {extra}" if extra else "")
        for event, extra in events.items()
    }
    with EventCounter(filters, _syscall_keys, name="strata-test") as counter:
        yield SyscallCounts(counter)
