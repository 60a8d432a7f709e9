"""Random layer stacks, rendered once for strata and once for the kernel.

A stack is a list of layers; each layer is a list of items (files of every
type, hardlinks, whiteouts, opaque marks). The strata rendering spells each
whiteout and opaque mark in a randomly chosen convention (OCI `.wh.` files,
overlayfs char devices, trusted or user xattrs); the kernel rendering always
uses overlayfs's, which is all the kernel reads.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import struct
from dataclasses import dataclass, field

NAMES = ["a", "b", "c", "d", "e", "L" * 200, "n\udcff"]
# A valid VFS capability (v2): cap_net_bind_service, effective.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
MODES = [0o644, 0o600, 0o755, 0o444, 0o4755, 0o2755, 0o700]
DIR_MODES = [0o755, 0o700, 0o1777, 0o2775]
OWNERS = [0, 1000, 65534]


@dataclass
class Item:
    path: str
    kind: str  # file dir symlink hardlink fifo socket chr blk whiteout opaque
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""
    rdev: int = 0
    mtime_ns: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    style: str = "overlay"  # how strata's rendering spells a whiteout/opaque mark


Layer = list[Item]


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def generate(seed: int, layers: int | None = None) -> list[Layer]:
    rng = random.Random(seed)
    count = layers or rng.randint(4, 6)
    seen: list[str] = []  # paths created in lower layers, targets for whiteouts
    stack: list[Layer] = []
    for _ in range(count):
        kinds: dict[str, str] = {}  # path -> kind within this layer
        items: Layer = []

        def claim(path: str, kind: str, kinds: dict[str, str] = kinds) -> bool:
            parts = path.split("/")
            for depth in range(1, len(parts)):
                ancestor = "/".join(parts[:depth])
                if kinds.get(ancestor, "dir") != "dir":
                    return False
            if path in kinds:
                return False
            for depth in range(1, len(parts)):
                kinds.setdefault("/".join(parts[:depth]), "dir")
            kinds[path] = kind
            return True

        def random_path() -> str:
            if seen and rng.random() < 0.5:
                return rng.choice(seen)
            depth = rng.choice([1, 1, 2, 2, 3])
            return "/".join(rng.choice(NAMES) for _ in range(depth))

        for _ in range(rng.randint(8, 25)):
            path = random_path()
            kind = rng.choices(
                [
                    "file",
                    "dir",
                    "symlink",
                    "hardlink",
                    "fifo",
                    "socket",
                    "chr",
                    "blk",
                    "whiteout",
                    "opaque",
                ],
                weights=[30, 12, 6, 6, 3, 2, 2, 2, 14, 6],
            )[0]
            if kind == "socket" and len(path.rpartition("/")[2]) > 50:
                kind = "fifo"  # AF_UNIX addresses are limited to 108 bytes
            item = Item(
                path=path,
                kind=kind,
                uid=rng.choice(OWNERS),
                gid=rng.choice(OWNERS),
                mtime_ns=rng.randrange(10**9, 2 * 10**18),
                style=rng.choice(["oci", "overlay", "user"]),
            )
            if kind == "file":
                item.mode = rng.choice(MODES)
                item.data = rng.randbytes(rng.choice([0, 1, 300, 5000, 70000]))
                if rng.random() < 0.3:
                    item.xattrs["user.note"] = rng.randbytes(8)
                if rng.random() < 0.15:
                    item.xattrs["trusted.t"] = b"x"
                if rng.random() < 0.15:
                    item.xattrs["security.capability"] = CAPABILITY
            elif kind == "dir":
                item.mode = rng.choice(DIR_MODES)
                if rng.random() < 0.2:
                    item.xattrs["user.dir"] = b"d"
            elif kind == "symlink":
                item.target = rng.choice(
                    ["a", "../b", "/nonexistent/strata/passwd", "c/d", "L" * 150]
                )
            elif kind == "hardlink":
                files = [i for i in items if i.kind == "file"]
                if not files:
                    continue
                item.target = rng.choice(files).path
            elif kind in ("fifo", "socket"):
                item.mode = rng.choice([0o644, 0o600, 0o666])
            elif kind in ("chr", "blk"):
                item.mode = 0o660
                # The operation tests open, read and write what they find, as
                # root: only devices harmless to write that read the same each
                # time (null, zero, full; block major 1 is a RAM disk), never a
                # tty, a disk, /dev/port or urandom.
                item.rdev = os.makedev(1, rng.choice([3, 5, 7]))
            if kind == "opaque":
                if kinds.get(path) == "dir":
                    items.append(item)
                    continue
                if not claim(path, "dir"):
                    continue
                items.append(Item(path=path, kind="dir", mode=0o755, mtime_ns=item.mtime_ns))
                items.append(item)
                continue
            if not claim(path, kind):
                continue
            items.append(item)
            if kind not in ("whiteout",):
                seen.append(path)
        stack.append(items)
    return stack


def render(stack: list[Layer], dest: str, *, for_kernel: bool) -> list[str]:
    """Write the layers under *dest*; return their paths, lowest first."""
    paths = []
    for number, items in enumerate(stack):
        top = os.path.join(dest, f"L{number}")
        os.makedirs(top)
        _render_layer(items, top, for_kernel)
        os.utime(top, ns=(10**18 + number, 10**18 + number))
        paths.append(top)
    return paths


def _render_layer(items: Layer, top: str, for_kernel: bool) -> None:
    explicit_dirs = {item.path for item in items if item.kind == "dir"}
    dirs: dict[str, Item] = {}

    def ensure_parents(path: str) -> None:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            rel = "/".join(parts[:depth])
            full = os.path.join(top, rel)
            if not os.path.isdir(full):
                os.mkdir(full)
                if rel not in explicit_dirs:
                    dirs[rel] = Item(path=rel, kind="dir", mode=0o755, mtime_ns=10**18)

    for item in items:
        full = os.path.join(top, item.path)
        ensure_parents(item.path)
        name = os.path.basename(item.path)
        if item.kind == "file":
            with open(full, "wb") as handle:
                handle.write(item.data)
        elif item.kind == "dir":
            os.mkdir(full)
            dirs[item.path] = item
        elif item.kind == "symlink":
            os.symlink(item.target, full)
        elif item.kind == "hardlink":
            os.link(os.path.join(top, item.target), full)
        elif item.kind == "fifo":
            os.mkfifo(full)
        elif item.kind == "socket":
            # Bind by a short relative name: AF_UNIX paths are limited to 108 bytes.
            here = os.getcwd()
            os.chdir(os.path.dirname(full))
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.bind(name)
            finally:
                os.chdir(here)
        elif item.kind in ("chr", "blk"):
            kind = stat.S_IFCHR if item.kind == "chr" else stat.S_IFBLK
            os.mknod(full, kind | item.mode, item.rdev)
        elif item.kind == "whiteout":
            if for_kernel or item.style != "oci":
                os.mknod(full, stat.S_IFCHR | 0o600, 0)
            else:
                open(os.path.join(os.path.dirname(full), ".wh." + name), "wb").close()
        elif item.kind == "opaque":
            if for_kernel or item.style == "overlay":
                os.setxattr(full, "trusted.overlay.opaque", b"y")
            elif item.style == "user":
                os.setxattr(full, "user.overlay.opaque", b"y")
            else:
                open(os.path.join(full, ".wh..wh..opq"), "wb").close()
        if item.kind in ("file", "symlink", "fifo", "socket", "chr", "blk"):
            os.chown(full, item.uid, item.gid, follow_symlinks=False)
            if item.kind != "symlink":
                os.chmod(full, item.mode)
            for key, value in item.xattrs.items():
                os.setxattr(full, key, value, follow_symlinks=False)
    # Times last: creating entries moves a directory's mtime.
    for item in items:
        if item.kind in ("file", "symlink", "fifo", "socket", "chr", "blk"):
            full = os.path.join(top, item.path)
            os.utime(full, ns=(item.mtime_ns, item.mtime_ns), follow_symlinks=False)
    for rel in sorted(dirs, key=lambda p: p.count("/"), reverse=True):
        item = dirs[rel]
        full = os.path.join(top, rel)
        os.chown(full, item.uid, item.gid)
        os.chmod(full, item.mode)
        for key, value in item.xattrs.items():
            os.setxattr(full, key, value)
        os.utime(full, ns=(item.mtime_ns, item.mtime_ns))
