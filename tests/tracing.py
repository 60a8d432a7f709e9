"""Counting a process's system calls with the kernel's syscall tracepoints.

strace stops the traced thread at every call, which slows the daemon so
much that the timing the tests look at (is the next request already queued
when the last reply is out?) is not the one it has untraced. A tracepoint
costs the thread almost nothing. The events go to a tracing instance of our
own (other tracing on the machine is left alone), filtered to one thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator


def _tracefs() -> Iterator[str]:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] == "tracefs":
                yield fields[1]
                return
    own = tempfile.mkdtemp(prefix="strata-test-tracefs-")
    subprocess.run(["mount", "-t", "tracefs", "nodev", own], check=True)
    try:
        yield own
    finally:
        subprocess.run(["umount", own], check=False)
        os.rmdir(own)


class SyscallCounts:
    """Calls of each traced event so far (read them inside the block)."""

    def __init__(self, pipe: int) -> None:
        self._pipe, self._rest = pipe, b""
        self.found: dict[str, int] = {}

    def counts(self) -> dict[str, int]:
        while True:
            try:
                chunk = os.read(self._pipe, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            lines = (self._rest + chunk).split(b"\n")
            self._rest = lines.pop()
            # An entry shows as "sys_NAME(arguments)", an exit as "sys_NAME -> value".
            for name, kind in re.findall(rb": sys_(\w+)( ->|\()", b"\n".join(lines)):
                key = f"sys_{'exit' if kind == b' ->' else 'enter'}_{name.decode()}"
                self.found[key] = self.found.get(key, 0) + 1
        return dict(self.found)


@contextlib.contextmanager
def syscalls_of(tid: int, events: dict[str, str]) -> Iterator[SyscallCounts]:
    """Trace *events* (e.g. {"sys_enter_ppoll": "", "sys_exit_ppoll": "ret == 0"}:
    name -> extra filter) of thread *tid* while the block runs."""
    with contextlib.ExitStack() as stack:
        tracefs = stack.enter_context(contextlib.contextmanager(_tracefs)())
        instance = os.path.join(tracefs, "instances", f"strata-test-{os.getpid()}")
        os.mkdir(instance)
        stack.callback(os.rmdir, instance)  # removing it disables its events
        with open(os.path.join(instance, "buffer_size_kb"), "w") as size:
            size.write("8192")
        for event, extra in events.items():
            path = os.path.join(instance, "events", "syscalls", event)
            condition = f"common_pid == {tid}" + (f" && {extra}" if extra else "")
            with open(os.path.join(path, "filter"), "w") as handle:
                handle.write(condition)
            with open(os.path.join(path, "enable"), "w") as handle:
                handle.write("1")
        pipe = os.open(os.path.join(instance, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
        stack.callback(os.close, pipe)
        yield SyscallCounts(pipe)
