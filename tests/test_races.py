"""Nothing outside UPPER, whatever processes in the container do.

A process in the container can turn a directory of UPPER into a symlink to
any host path (rename it away, make a symlink in its place). strata must
never follow such a symlink on the host: a canary tree outside, holding the
same names, stays byte- and metadata-identical, and nothing from it is ever
read back through the mount. The processes run chrooted into the mount, so
their own path walks stay inside it, as a container's do.
"""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time
from collections.abc import Callable

from tests.layers import write
from tests.mounts import patched_mount, strata_mount
from tests.trees import Snapshot, differences, snapshot

CANARY = b"CANARY-outside-the-mount"


def _canary(scratch: str) -> str:
    """A host tree with the names the container uses, for a strata that follows a symlink."""
    top = os.path.join(scratch, "canary")
    for name in ("f", "big", "g", "new", "x/f", "x/big", "d/f"):
        write(f"{top}/{name}", CANARY * 10)
    os.makedirs(f"{top}/dir", exist_ok=True)
    return top


def _places(scratch: str) -> tuple[str, Snapshot, str, str, str, str]:
    """The canary and its snapshot, then UPPER (made), WORK, the store and
    the mountpoint of a test's mount."""
    canary = _canary(scratch)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    root, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    return canary, snapshot(canary), upper, work, root, mount


# Widens the window between the moment strata fixes where a file is and the
# moment a worker thread opens it: 0.3 s, while the flag file exists.
_SLOW_OPENS = """
import os, time
import unionfs.core.upper as upper_module

_flag = os.path.join(os.path.dirname(os.path.abspath(upper)), "slow")
_upper = os.path.abspath(upper) + "/"
_open = os.open
def _slow_open(path, *args, **kwargs):
    if isinstance(path, (str, bytes)) and os.fsdecode(path).startswith(_upper):
        if os.path.exists(_flag):
            time.sleep(0.3)
    return _open(path, *args, **kwargs)
os.open = _slow_open
if hasattr(upper_module, "open_beneath"):
    _beneath = upper_module.open_beneath
    def _slow_beneath(*args, **kwargs):
        if os.path.exists(_flag):
            if kwargs.get("cached_only"):  # the request thread's quick try: to the worker
                raise BlockingIOError("widened race: not cached")
            time.sleep(0.3)
        return _beneath(*args, **kwargs)
    upper_module.open_beneath = _slow_beneath
"""


def test_a_directory_swapped_for_a_symlink_mid_open_is_not_followed(scratch: str) -> None:
    """A read-only open of an upper file runs in a worker thread; meanwhile
    its directory is renamed and a symlink to the host put in its place. The
    open must get the file (where it is now), never the host's file."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/a/f", "lower f")
    canary = _canary(scratch)
    before = snapshot(canary)
    log_path = os.path.join(scratch, "daemon.log")
    seen: list[bytes | BaseException] = []
    with patched_mount(scratch, lower, _SLOW_OPENS, log_path) as (mount, daemon):
        with open(f"{mount}/a/f", "ab") as handle:  # copied up: opened in UPPER from now on
            handle.write(b" and upper")
        write(os.path.join(scratch, "slow"))

        def reader() -> None:
            try:
                with open(f"{mount}/a/f", "rb") as handle:
                    seen.append(handle.read())
            except OSError as exc:
                seen.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        time.sleep(0.1)  # the worker thread waits in its open
        os.rename(f"{mount}/a", f"{mount}/a.moved")
        os.symlink(canary, f"{mount}/a")  # in UPPER: a symlink to the host's canary
        thread.join()
        os.unlink(os.path.join(scratch, "slow"))
        os.unlink(f"{mount}/a")  # before anything here walks the mount's /a
    assert daemon.returncode == 0
    assert seen == [b"lower f and upper"], seen
    assert differences(before, snapshot(canary)) == []


def _in_chroot(mount: str, seconds: float, body: Callable[[random.Random], None], seed: int) -> int:
    """Fork a process chrooted into *mount* running *body* until *seconds*
    pass; its exit status (1 if it read the canary)."""
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        status = 0
        try:
            os.chroot(mount)
            os.chdir("/")
            rng = random.Random(seed)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    body(rng)
                except _ReadCanary:
                    status = 1
                    break
                except OSError:
                    pass  # the other process moved things: any errno is fair
        except BaseException:
            status = 2
        os._exit(status)
    return pid


class _ReadCanary(Exception):
    pass


def _read(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if CANARY in os.read(fd, 1 << 16):
            raise _ReadCanary(path)
    finally:
        os.close(fd)


def test_racing_symlink_swaps_never_reach_outside(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    for top in ("x", "d"):
        write(f"{lower}/{top}/f", f"{top} lower data")
        write(f"{lower}/{top}/big", os.urandom(5 << 20))  # copied up chunk by chunk
        write(f"{lower}/{top}/g", "g")
    canary, before, upper, work, root, mount = _places(scratch)

    def swapper(rng: random.Random) -> None:
        top = rng.choice(["/x", "/d"])
        os.rename(top, top + ".away")
        os.symlink(canary if rng.random() < 0.5 else canary + "/dir", top)
        time.sleep(rng.random() / 1000)
        os.unlink(top)
        os.rename(top + ".away", top)

    def changer(rng: random.Random) -> None:
        top = rng.choice(["/x", "/d"])
        name = rng.choice(["f", "big", "g", "new"])
        path = f"{top}/{name}"
        kind = rng.randrange(12)
        if kind == 0:
            _read(path)
        elif kind == 1:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            os.write(fd, b"w")
            os.close(fd)
        elif kind == 2:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            os.pwrite(fd, b"chunk", rng.randrange(5 << 20))
            os.close(fd)
        elif kind == 3:
            os.chmod(path, 0o640 | rng.randrange(2) * 0o004)
        elif kind == 4:
            os.chown(path, rng.randrange(3), rng.randrange(3))
        elif kind == 5:
            os.utime(path, ns=(rng.randrange(1 << 40), rng.randrange(1 << 40)))
        elif kind == 6:
            os.setxattr(path, "user.race", b"v", follow_symlinks=False)
        elif kind == 7:
            os.rename(path, f"{top}/moved")
            os.rename(f"{top}/moved", path)
        elif kind == 8:
            os.link(path, f"{top}/linked")
            os.unlink(f"{top}/linked")
        elif kind == 9:
            os.mkdir(f"{top}/dir")
            os.rmdir(f"{top}/dir")
        elif kind == 10:
            fd = os.open(f"{top}/new", os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
            os.write(fd, b"new")
            os.close(fd)
            _read(f"{top}/new")
        else:
            os.unlink(f"{top}/new")

    with strata_mount(root, [lower], mount, "--upper", upper, "--work", work):
        children = [_in_chroot(mount, 6, swapper, 1)]
        children += [_in_chroot(mount, 6, changer, seed) for seed in (2, 3, 4)]
        statuses = [os.waitpid(pid, 0)[1] for pid in children]
        # Put back what a swapper stopped mid-way left, then read everything.
        for top in ("x", "d"):
            if os.path.islink(f"{mount}/{top}"):
                os.unlink(f"{mount}/{top}")
            if os.path.lexists(f"{mount}/{top}.away"):
                os.rename(f"{mount}/{top}.away", f"{mount}/{top}")
        for top in ("x", "d"):
            for name in os.listdir(f"{mount}/{top}"):
                path = f"{mount}/{top}/{name}"
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as handle:
                        assert CANARY not in handle.read(), path
    assert [os.waitstatus_to_exitcode(status) for status in statuses] == [0, 0, 0, 0]
    assert differences(before, snapshot(canary)) == []


def _chrooted_steps(mount: str, steps: dict[str, Callable[[], object]]) -> dict[str, str]:
    """Run *steps* in a process chrooted into *mount*, as a container's; what
    each gave: "ok", an errno's name, or "canary" where it read the canary."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        results: dict[str, str] = {}
        try:
            os.close(reader)
            os.chroot(mount)
            os.chdir("/")
            for name, step in steps.items():
                try:
                    step()
                    results[name] = "ok"
                except _ReadCanary:
                    results[name] = "canary"
                except OSError as exc:
                    results[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            os.write(writer, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        raw = pipe.read()
    os.waitpid(pid, 0)
    return dict(json.loads(raw))


def test_upper_swapped_behind_the_mount_is_never_followed_outside(scratch: str) -> None:
    """Only the mount changes UPPER, so the daemon's tree and UPPER agree. Should
    they not (a directory of UPPER swapped on the host for a symlink to the
    canary, behind the mount's back), a change through the mount to a file
    the kernel still knows under it acts in UPPER's own directory or fails:
    no host call follows a symlink of UPPER before its last component,
    whether the daemon holds the directory open already (d) or opens it
    again (h, after a directory rename made it drop what it held)."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/keep", "lower")
    canary, before, upper, work, root, mount = _places(scratch)

    def steps(top: str) -> dict[str, Callable[[], object]]:
        return {
            "chmod": lambda: os.chmod(f"{top}/f", 0o600),
            "chown": lambda: os.chown(f"{top}/f", 7, 7),
            "utime": lambda: os.utime(f"{top}/f", ns=(1, 2)),
            "setxattr": lambda: os.setxattr(f"{top}/f", "user.swap", b"v"),
            "truncate": lambda: os.truncate(f"{top}/f", 1),
            "write": lambda: write(f"{top}/x/f", "changed"),
            "create": lambda: write(f"{top}/new", "new"),
            "mkdir": lambda: os.mkdir(f"{top}/dir2"),
            "symlink": lambda: os.symlink("t", f"{top}/link"),
            "link": lambda: os.link(f"{top}/g", f"{top}/big"),
            "rename": lambda: os.rename(f"{top}/g", f"{top}/g2"),
            "unlink": lambda: os.unlink(f"{top}/x/f"),
            "read": lambda: _read(f"{top}/f"),
        }

    def swap(top: str) -> None:  # on the host: TOP moved away, a symlink to the canary there
        os.rename(f"{upper}/{top}", f"{upper}/{top}.away")
        os.symlink(canary, f"{upper}/{top}")

    with strata_mount(root, [lower], mount, "--upper", upper, "--work", work):
        os.makedirs(f"{mount}/e")
        for top in ("d", "h"):
            for name in ("f", "g", "x/f"):
                write(f"{mount}/{top}/{name}", f"{top}/{name} in upper")
            os.listdir(f"{mount}/{top}/x")
        swap("d")
        held = _chrooted_steps(mount, steps("/d"))
        os.rename(f"{mount}/e", f"{mount}/e2")  # a directory moved: held ones dropped
        swap("h")
        reopened = _chrooted_steps(mount, steps("/h"))
    assert differences(before, snapshot(canary)) == [], (held, reopened)
    assert "canary" not in {*held.values(), *reopened.values()}, (held, reopened)
    assert held["chmod"] == "ok", held  # acted in UPPER's own d
    assert os.stat(f"{upper}/d.away/f").st_mode & 0o777 == 0o600
    assert reopened["chmod"] in ("ELOOP", "ENOTDIR"), reopened  # h is a symlink now: refused


def test_work_swapped_behind_the_mount_is_never_followed_outside(scratch: str) -> None:
    """WORK as UPPER: its directories swapped on the host for symlinks to the
    canary, copy-ups through the mount (a file's data, a directory, a group
    of hard links, each built in WORK first) act in WORK's own directories
    or fail; the canary stays identical, its directory times too."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/a/f", "lower data")
    write(f"{lower}/h1", "linked")
    os.link(f"{lower}/h1", f"{lower}/h2")
    canary, before, upper, work, root, mount = _places(scratch)
    with strata_mount(root, [lower], mount, "--upper", upper, "--work", work):
        os.listdir(f"{mount}/a")
        for name in ("strata-tmp", "strata-links"):
            os.rename(f"{work}/{name}", f"{work}/{name}.away")
            os.symlink(canary, f"{work}/{name}")
        results = {
            "append": _attempt(lambda: _append(f"{mount}/a/f", b"x")),
            "chmod dir": _attempt(lambda: os.chmod(f"{mount}/a", 0o700)),
            "unlink link": _attempt(lambda: os.unlink(f"{mount}/h1")),
        }
    assert differences(before, snapshot(canary)) == [], results


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def _attempt(step: Callable[[], object]) -> str:
    try:
        step()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"
