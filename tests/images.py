"""Images built with real tools for the image tests: umoci layers over a
busybox-static root, plus a hand-written layer for what umoci never writes
(an opaque marker after the directory's own entries, implied directories)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Sequence

BUSYBOX = "/bin/busybox"


def run(*command: str, cwd: str | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)


def _tar_member(
    archive: tarfile.TarFile,
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    **extra: object,
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = int(extra.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644))  # type: ignore[call-overload]
    info.mtime = 1_600_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in extra.items():
        setattr(info, key, value)
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def hand_layer(path: str) -> None:
    """Layer 3: opaque marker last in its directory, implied parents, a long
    name, PAX xattrs and ownership."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        _tar_member(archive, "opt/old/", tarfile.DIRTYPE, mode=0o750)
        _tar_member(archive, "opt/old/fresh", data=b"added with the opaque mark\n")
        _tar_member(archive, "opt/old/.wh..wh..opq")
        # var/ and var/cache/ are only implied: they keep the lower metadata.
        _tar_member(archive, "var/cache/implied.txt", data=b"implied parents\n", uid=1000, gid=1000)
        long_dir = "usr/share/" + "d" * 120
        _tar_member(archive, long_dir + "/", tarfile.DIRTYPE)
        _tar_member(archive, long_dir + "/" + "n" * 150, data=b"long name\n")
        info = tarfile.TarInfo("etc/xattr-file")
        info.size, info.mode, info.mtime = 5, 0o600, 1_600_000_000
        info.pax_headers = {"SCHILY.xattr.user.origin": "hand", "SCHILY.xattr.trusted.note": "t"}
        archive.addfile(info, io.BytesIO(b"xattr"))


def build_busybox(top: str) -> tuple[str, str]:
    """An OCI layout with a three-layer busybox image; returns (layout, tag)."""
    layout, tag, bundle = f"{top}/layout", "v1", f"{top}/bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:{tag}")
    run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
    rootfs = f"{bundle}/rootfs"
    # Layer 1: a small busybox system.
    os.makedirs(f"{rootfs}/bin")
    shutil.copy2(BUSYBOX, f"{rootfs}/bin/busybox")
    for applet in ("ls", "cat"):
        os.link(f"{rootfs}/bin/busybox", f"{rootfs}/bin/{applet}")
    for applet in ("sh", "echo", "mkdir"):
        os.symlink("busybox", f"{rootfs}/bin/{applet}")
    shutil.copy2(BUSYBOX, f"{rootfs}/bin/su")
    os.chmod(f"{rootfs}/bin/su", 0o4755)
    _write(
        f"{rootfs}/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home:/bin/sh\n"
    )
    _write(f"{rootfs}/etc/motd", "welcome\n")
    _write(f"{rootfs}/etc/shadow", "root:*:1::::::\n", 0o640)
    os.chown(f"{rootfs}/etc/shadow", 0, 42)
    os.setxattr(f"{rootfs}/etc/motd", "user.comment", b"greeting")
    os.makedirs(f"{rootfs}/home/user")
    os.chown(f"{rootfs}/home/user", 1000, 1000)
    _write(f"{rootfs}/var/lib/data/one", "one\n")
    _write(f"{rootfs}/var/lib/data/two", "two\n")
    _write(f"{rootfs}/opt/old/a", "old a\n")
    _write(f"{rootfs}/opt/old/b", "old b\n")
    _write(f"{rootfs}/srv/swap", "a file, later a directory\n")
    _write(f"{rootfs}/lib/was-dir/inner", "inner\n")
    os.makedirs(f"{rootfs}/tmp")
    os.chmod(f"{rootfs}/tmp", 0o1777)
    os.mkfifo(f"{rootfs}/tmp/fifo", 0o644)
    os.makedirs(f"{rootfs}/dev")
    os.mknod(f"{rootfs}/dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    os.chmod(f"{rootfs}/dev/null", 0o666)  # mknod's mode went through the umask
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{tag}", bundle)
    # Layer 2: deletions (files and a directory) and type changes.
    os.unlink(f"{rootfs}/etc/motd")
    shutil.rmtree(f"{rootfs}/var/lib/data")
    os.unlink(f"{rootfs}/srv/swap")
    _write(f"{rootfs}/srv/swap/now-a-dir", "dir now\n")
    shutil.rmtree(f"{rootfs}/lib/was-dir")
    os.symlink("/srv", f"{rootfs}/lib/was-dir")
    _write(f"{rootfs}/usr/bin/hello", "#!/bin/sh\necho hello\n", 0o755)
    os.link(f"{rootfs}/usr/bin/hello", f"{rootfs}/usr/bin/hello-again")
    run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
    # Layer 3, by hand.
    hand_layer(f"{top}/layer3.tar")
    run("umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", f"{top}/layer3.tar")
    shutil.rmtree(bundle)
    return layout, tag


def umoci_rootfs(layout: str, tag: str, target: str) -> str:
    """What umoci unpacks for the image: the reference tree."""
    run("umoci", "unpack", "--image", f"{layout}:{tag}", target)
    return f"{target}/rootfs"


DEBIAN_MIRROR = os.environ.get("STRATA_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def debootstrap_image(top: str, tag: str, include: Sequence[str] = ()) -> tuple[str, str]:
    """A minbase Debian 12 made by debootstrap (with the packages *include*),
    packed by umoci as one layer; returns (layout, bundle), the bundle kept
    for the layers that follow."""
    rootfs_source = f"{top}/debootstrap"
    extra = [f"--include={','.join(include)}"] if include else []
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", *extra, "bookworm", rootfs_source, DEBIAN_MIRROR],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise AssertionError("debootstrap failed: " + " | ".join(tail))
    layout, bundle = f"{top}/layout", f"{top}/bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:{tag}")
    run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
    os.rmdir(f"{bundle}/rootfs")
    os.rename(rootfs_source, f"{bundle}/rootfs")
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{tag}", bundle)
    return layout, bundle


def build_debian(top: str) -> tuple[str, str]:
    """A minbase Debian 12 image made by debootstrap, packed by umoci as one
    layer, plus a second layer that removes and changes files as an update
    would; returns (layout, tag)."""
    tag = "bookworm"
    layout, bundle = debootstrap_image(top, tag)
    rootfs = f"{bundle}/rootfs"
    shutil.rmtree(f"{rootfs}/usr/share/doc")
    shutil.rmtree(f"{rootfs}/var/cache/apt")
    os.makedirs(f"{rootfs}/var/cache/apt")
    _write(f"{rootfs}/etc/motd", "updated\n")
    run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
    shutil.rmtree(bundle)
    return layout, tag
