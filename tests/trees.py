"""Full snapshots of a directory tree, for comparing two mounts."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    kind: str  # d f l p s c b
    d_type: str  # the kind readdir reported
    mode: int
    uid: int
    gid: int
    size: int | None  # None for directories (compared through nlink/entries)
    mtime_ns: int
    nlink: int
    rdev: int
    content: str | None
    target: bytes | None
    xattrs: tuple[tuple[str, bytes], ...]


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "d"),
        (stat.S_ISREG, "f"),
        (stat.S_ISLNK, "l"),
        (stat.S_ISFIFO, "p"),
        (stat.S_ISSOCK, "s"),
        (stat.S_ISCHR, "c"),
        (stat.S_ISBLK, "b"),
    ):
        if test(mode):
            return kind
    return "?"


def _d_type(entry: os.DirEntry[bytes]) -> str:
    if entry.is_symlink():
        return "l"
    if entry.is_dir(follow_symlinks=False):
        return "d"
    if entry.is_file(follow_symlinks=False):
        return "f"
    return "o"  # fifo, socket, device: DirEntry has no finer test


def _xattrs(path: bytes) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    return tuple(sorted((name, os.getxattr(path, name, follow_symlinks=False)) for name in names))


@dataclass
class Snapshot:
    nodes: dict[bytes, Node]
    hardlink_groups: set[frozenset[bytes]]
    listings: dict[bytes, list[bytes]]
    # Names readdir listed that lstat could not find: overlayfs lists a whiteout
    # in a directory that exists in one layer only (it reads such a directory
    # straight from the layer); strata never shows whiteouts.
    phantoms: list[bytes]


def snapshot(top: str) -> Snapshot:
    root = os.fsencode(top)
    nodes: dict[bytes, Node] = {}
    listings: dict[bytes, list[bytes]] = {}
    phantoms: list[bytes] = []
    by_ino: dict[int, set[bytes]] = {}
    pending: list[tuple[bytes, str]] = [(b"", "d")]
    while pending:
        rel, d_type = pending.pop()
        path = root + b"/" + rel if rel else root
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            phantoms.append(rel)
            parent, _, name = rel.rpartition(b"/")
            listings[parent].remove(name)
            continue
        kind = _kind(st.st_mode)
        content = target = None
        if kind == "f":
            with open(path, "rb") as handle:
                content = hashlib.sha256(handle.read()).hexdigest()
        elif kind == "l":
            target = os.readlink(path)
        nodes[rel] = Node(
            kind=kind,
            d_type=d_type,
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            size=None if kind == "d" else st.st_size,
            mtime_ns=st.st_mtime_ns,
            nlink=st.st_nlink,
            rdev=st.st_rdev if kind in "cb" else 0,
            content=content,
            target=target,
            xattrs=_xattrs(path),
        )
        if kind != "d":
            by_ino.setdefault(st.st_ino, set()).add(rel)
            continue
        with os.scandir(path) as entries:
            children = [(entry.name, _d_type(entry)) for entry in entries]
        listings[rel] = sorted(name for name, _ in children)
        for name, child_type in children:
            pending.append((rel + b"/" + name if rel else name, child_type))
    groups = {frozenset(paths) for paths in by_ino.values() if len(paths) > 1}
    return Snapshot(nodes, groups, listings, phantoms)


def differences(
    expected: Snapshot,
    actual: Snapshot,
    *,
    times: bool = True,
    changed_between: tuple[int, int] | None = None,
) -> list[str]:
    """What differs between the oracle's tree and ours, one line per finding.

    overlayfs reports st_nlink 1 for a directory merged from several layers; we
    report the true count (2 + subdirectories), checked against the listing.
    Without *times*, mtimes are left out (two mounts changed at different moments).
    With *changed_between* (ns), only the mtimes the oracle shows inside that
    window are left out: those an operation set to the time it ran. Every other
    time (a lower entry's, one set by utimensat) must be the same.
    """
    found: list[str] = []
    for rel in sorted(set(expected.nodes) | set(actual.nodes)):
        want, got = expected.nodes.get(rel), actual.nodes.get(rel)
        if want is None or got is None:
            found.append(f"{rel!r}: only in {'ours' if want is None else 'oracle'}")
            continue
        ran_then = changed_between is not None and (
            changed_between[0] <= want.mtime_ns <= changed_between[1]
        )
        if not times or ran_then:
            want = Node(**{**want.__dict__, "mtime_ns": 0})
            got = Node(**{**got.__dict__, "mtime_ns": 0})
        if want.kind == "d" and got.kind == "d" and want.nlink == 1 != got.nlink:
            subdirs = sum(
                1
                for name in actual.listings[rel]
                if actual.nodes[rel + b"/" + name if rel else name].kind == "d"
            )
            if got.nlink != 2 + subdirs:
                found.append(f"{rel!r}: dir nlink {got.nlink}, has {subdirs} subdirs")
            want = Node(**{**want.__dict__, "nlink": got.nlink})
        if want != got:
            found.append(f"{rel!r}: oracle {want} != ours {got}")
    if expected.listings != actual.listings:
        found.append("readdir listings differ")
    if expected.hardlink_groups != actual.hardlink_groups:
        found.append(
            f"hardlink groups: oracle {sorted(map(sorted, expected.hardlink_groups))}"
            f" != ours {sorted(map(sorted, actual.hardlink_groups))}"
        )
    return found
