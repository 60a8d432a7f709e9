"""Volumes: host directories bound into a mounted image, as Docker's data
volumes are. Reads and writes under the volume's path go to the host
directory at kernel speed and never touch the container layer.

The bind target is reached one component at a time with O_NOFOLLOW: an image
holding `data -> /` must not turn `--volume /x:/data` into a bind over the
host's root. Missing directories on the way are made in the container layer,
as Docker does. The binds are recorded beside the mount's pid file so
`strata umount` removes exactly them before the mount itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from dataclasses import dataclass

from .core.syscalls import mount, umount2
from .errors import StrataError

_MS_RDONLY = 1
_MS_REMOUNT = 32
_MS_BIND = 4096


@dataclass(frozen=True, slots=True)
class Volume:
    host: str
    path: str  # absolute inside the mount
    read_only: bool = False


def parse_volume(text: str) -> Volume:
    parts = text.split(":")
    mode = "rw"
    if len(parts) == 3:
        mode = parts.pop()
    if len(parts) != 2 or not parts[0] or not parts[1] or mode not in ("ro", "rw"):
        raise StrataError(f"--volume {text!r}: write HOSTDIR:/PATH[:ro]")
    host, path = parts
    if not path.startswith("/"):
        raise StrataError(f"--volume {text!r}: the path inside must be absolute")
    inside = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in inside or not inside:
        raise StrataError(f"--volume {text!r}: the path inside must name a directory below /")
    if not os.path.isdir(host):
        raise StrataError(f"--volume {text!r}: {host} is not a directory")
    return Volume(os.path.realpath(host), "/" + "/".join(inside), mode == "ro")


def _mount(source: str | None, target: str, flags: int) -> None:
    mount(None if source is None else os.fsencode(source), os.fsencode(target), flags)


def _open_target(mountpoint: str, path: str) -> int:
    """An O_PATH descriptor of the volume's directory in the mount, made if missing."""
    current = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in path.strip("/").split("/"):
            try:
                st = os.stat(part, dir_fd=current, follow_symlinks=False)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=current)
                st = os.stat(part, dir_fd=current, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise StrataError(f"volume path {path}: {part!r} in the image is {kind}")
            following = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
            )
            os.close(current)
            current = following
    except BaseException:
        os.close(current)
        raise
    return current


def record_path(pid_file: str) -> str:
    return pid_file.removesuffix(".pid") + ".volumes"


def attach(mountpoint: str, volumes: list[Volume], pid_file: str) -> None:
    """Bind each volume into the mount; on failure undo the binds made."""
    made: list[str] = []
    try:
        for volume in volumes:
            fd = _open_target(mountpoint, volume.path)
            target = mountpoint.rstrip("/") + volume.path
            try:
                # Through the descriptor: the directory checked, not a path
                # that could have changed since.
                _mount(volume.host, f"/proc/self/fd/{fd}", _MS_BIND)
            finally:
                os.close(fd)
            made.append(target)
            if volume.read_only:
                _mount(None, target, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
        with open(record_path(pid_file), "w") as handle:
            json.dump(made, handle)
    except OSError as exc:
        detach_all(made)
        raise StrataError(f"cannot bind volume at {exc.filename}: {exc.strerror}") from None
    except BaseException:
        detach_all(made)
        raise


def detach_all(targets: list[str]) -> None:
    for target in sorted(targets, key=len, reverse=True):
        try:
            umount2(os.fsencode(target), 0)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
                raise StrataError(f"cannot unbind volume {target}: {exc.strerror}") from None


def detach(pid_file: str) -> None:
    """Remove the binds `attach` recorded for a mount."""
    path = record_path(pid_file)
    try:
        with open(path) as handle:
            targets = [str(item) for item in json.load(handle)]
    except (FileNotFoundError, ValueError):
        return
    detach_all(targets)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
