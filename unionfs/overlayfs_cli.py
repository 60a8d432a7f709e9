"""`strata-overlayfs`: fuse-overlayfs's command line, served by strata.

    strata-overlayfs [-f] [--debug] -o lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W][,...] DIR

so tools that run fuse-overlayfs (containers-storage's mount_program,
scripts, fstab through mount.fuse3) can run strata instead. lowerdir is in
overlay's order, top layer first. Every option is either honoured, ignored
with a warning that says what differs, or refused; none silently changes
behaviour. The table is OPTIONS; the README prints it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .core.atime import RELATIME, AtimeMode, AtimePolicy
from .errors import StrataError, error_line
from .idmap import ID_MAX, IdMap, Ownership, overflow_id, parse_ranges
from .mount import DEFAULT_SOURCE, RESTRICTIONS, SUBTYPE, checked_source, checked_subtype

SUPPORTED, IGNORED, REFUSED = "supported", "ignored with a warning", "refused"

# fuse-overlayfs's options (its man page, then those its source also takes),
# and the generic mount options mount.fuse3 passes on.
OPTIONS: dict[str, tuple[str, str]] = {
    "lowerdir": (SUPPORTED, "the lower layers, top first; `\\:` escapes a colon in a path"),
    "upperdir": (SUPPORTED, "the writable layer, in overlayfs's upper format"),
    "workdir": (SUPPORTED, "on the upper directory's filesystem"),
    "uidmapping": (
        SUPPORTED,
        "STORED:SHOWN:LENGTH triples: stored owners show mapped, new and chowned ones are"
        " stored mapped back; an unmapped id shows as the overflow id and chown to one fails",
    ),
    "gidmapping": (SUPPORTED, "as uidmapping, for groups"),
    "squash_to_root": (SUPPORTED, "every owner shows as 0:0, and chown always succeeds"),
    "squash_to_uid": (SUPPORTED, "every owner shows as this uid (before squash_to_root)"),
    "squash_to_gid": (SUPPORTED, "every group shows as this gid (before squash_to_root)"),
    "metacopy": (
        SUPPORTED,
        "off by default, as in overlayfs: UPPER holds whole files at all times, since"
        " containers-storage reads it directly; `metacopy=on` makes chown and chmod copy no"
        " data and copies large files chunk by chunk as they are written",
    ),
    "static_nlink": (IGNORED, "directories keep their true link count"),
    "noacl": (SUPPORTED, "the kernel checks mode bits only; ACLs stay stored and inherited"),
    "fsync": (IGNORED, "copy-ups are always made durable before they show (as fsync=1)"),
    "volatile": (IGNORED, "fsync is never skipped"),
    "fast_ino": (IGNORED, "inode numbers always come from strata's index"),
    "writeback": (IGNORED, "strata never enables the writeback cache"),
    "noxattrs": (IGNORED, "extended attributes stay available"),
    "xattr_permissions": (IGNORED, "xattrs are checked by the kernel as on any filesystem"),
    "plugins": (REFUSED, "strata has no layer plugins"),
    "threaded": (IGNORED, "strata serves requests on trio, blocking work in threads"),
    "redirect_dir": (IGNORED, "directory renames always use redirects"),
    "timeout": (IGNORED, "strata sets its own cache timeouts (long: lower layers never change)"),
    "debug": (SUPPORTED, "serve in the foreground, logging every request"),
    "fsname": (
        SUPPORTED,
        "the mount's source as findmnt, df and umount show it; by default the SOURCE"
        " mount.fuse3 passes (`overlay` in `mount -t fuse.strata overlay ...`), else `strata`",
    ),
    "subtype": (
        SUPPORTED,
        "the mount's type is fuse.NAME (fuse.strata by default); `subtype=` with no name"
        " shows plain `fuse`, as tools that compare a mount's type with it expect",
    ),
    "passthrough": (
        SUPPORTED,
        "auto (the default), on or off: FUSE passthrough, the kernel reading and writing"
        " files' host copies itself; on refuses to mount without it",
    ),
    "ro": (SUPPORTED, "read-only even with an upper directory"),
    "rw": (SUPPORTED, "the default"),
    "allow_other": (SUPPORTED, "always on as root, as fuse-overlayfs does"),
    "allow_root": (IGNORED, "as root strata uses allow_other; otherwise only the owner"),
    "default_permissions": (SUPPORTED, "always on: the kernel checks permissions"),
    "dev": (SUPPORTED, "the default as root"),
    "suid": (SUPPORTED, "the default as root"),
    "exec": (SUPPORTED, "the default"),
    "noatime": (SUPPORTED, "no access changes an atime"),
    "atime": (SUPPORTED, "as relatime"),
    "relatime": (
        SUPPORTED,
        "the default, as on overlayfs: opening a file of the container layer for reading"
        " (listing a directory) updates its atime if older than its mtime or ctime, or a day"
        " old; lower layers' files keep theirs",
    ),
    "strictatime": (SUPPORTED, "as relatime, but every such access updates the atime"),
    "nodiratime": (SUPPORTED, "with relatime or strictatime: listings change no atime"),
    "diratime": (SUPPORTED, "the default: listings count as accesses"),
    "nodev": (SUPPORTED, "the kernel's mount flag: device nodes cannot be opened"),
    "nosuid": (SUPPORTED, "the kernel's mount flag: set-id bits and capabilities give nothing"),
    "noexec": (SUPPORTED, "the kernel's mount flag: nothing on the mount can be executed"),
    "context": (IGNORED, "no SELinux labels"),
    "fscontext": (IGNORED, "no SELinux labels"),
    "defcontext": (IGNORED, "no SELinux labels"),
    "rootcontext": (IGNORED, "no SELinux labels"),
}


@dataclass(frozen=True, slots=True)
class OverlayRequest:
    lower_top_first: list[str]
    upper: str | None
    work: str | None
    mountpoint: str
    foreground: bool
    read_only: bool
    warnings: list[str]
    restrictions: frozenset[str] = frozenset()
    ownership: Ownership | None = None
    metacopy: bool = False
    source: str = DEFAULT_SOURCE
    passthrough: str = "auto"
    acl: bool = True
    subtype: str = SUBTYPE
    atime: AtimePolicy = RELATIME


def split_options(text: str) -> list[tuple[str, str | None]]:
    """`a=b,c` into [(a, b), (c, None)]; a backslash escapes a comma."""
    items: list[tuple[str, str | None]] = []
    current = ""
    escaped = False
    for char in text + ",":
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            if current:
                key, sep, value = current.partition("=")
                items.append((key, value if sep else None))
            current = ""
        else:
            current += char
    return items


def split_lowerdir(value: str) -> list[str]:
    parts: list[str] = []
    current = ""
    escaped = False
    for char in value:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part for part in parts if part]


def parse_arguments(argv: Sequence[str]) -> OverlayRequest:
    options: list[tuple[str, str | None]] = []
    positional: list[str] = []
    foreground = False
    arguments = list(argv)
    while arguments:
        item = arguments.pop(0)
        if item == "-o":
            if not arguments:
                raise StrataError("-o needs options")
            options += split_options(arguments.pop(0))
        elif item.startswith("-o"):
            options += split_options(item[2:])
        elif item in ("-f", "--foreground"):
            foreground = True
        elif item in ("-d", "--debug"):
            options.append(("debug", None))
        elif item.startswith("-"):
            raise StrataError(f"unknown flag {item}")
        else:
            positional.append(item)
    if not positional:
        raise StrataError("no mountpoint given")
    # mount.fuse3 passes SOURCE MOUNTPOINT; fuse-overlayfs takes MOUNTPOINT.
    mountpoint = positional[-1]
    source = positional[0] if len(positional) > 1 else None
    lower: list[str] = []
    upper = work = None
    read_only = False
    warnings: list[str] = []
    restrictions: set[str] = set()
    mappings: dict[str, str] = {}
    squash: dict[str, int] = {}
    metacopy = False
    passthrough = "auto"
    acl = True
    subtype = SUBTYPE
    atime, nodiratime = AtimeMode.RELATIME, False  # the kernel's default for a mount
    for key, value in options:
        verdict, reason = OPTIONS.get(key, (IGNORED, "strata does not know this option"))
        if verdict == REFUSED:
            raise StrataError(f"option {key} is not supported: {reason}")
        if verdict == IGNORED:
            warnings.append(f"option {key} is ignored: {reason}")
            continue
        if key in ("lowerdir", "upperdir", "workdir") and not value:
            raise StrataError(f"option {key} needs a value")
        if key == "lowerdir":
            lower = split_lowerdir(value or "")
        elif key == "upperdir":
            upper = value
        elif key == "workdir":
            work = value
        elif key == "noacl":
            acl = False
        elif key == "ro":
            read_only = True
        elif key == "rw":
            read_only = False
        elif key == "debug":
            foreground = True
        elif key == "fsname":
            if not value:
                raise StrataError("option fsname needs a value")
            source = re.sub(r"\\(.)", r"\1", value)  # `\,` is a comma in it
        elif key == "subtype":
            subtype = checked_subtype(value or "")
        elif key in ("noatime", "relatime", "strictatime", "atime"):
            atime = AtimeMode(key if key != "atime" else "relatime")
        elif key in ("nodiratime", "diratime"):
            nodiratime = key == "nodiratime"
        elif key in ("uidmapping", "gidmapping"):
            if not value:
                raise StrataError(f"option {key} needs a value")
            mappings[key] = value
        elif key == "squash_to_root":
            squash.setdefault("uid", 0)
            squash.setdefault("gid", 0)
        elif key in ("squash_to_uid", "squash_to_gid"):
            if value is None or not value.isdigit() or int(value) > ID_MAX:
                raise StrataError(f"option {key} needs an id, a number up to {ID_MAX}")
            squash[key[-3:]] = int(value)  # over squash_to_root, wherever it stands
        elif key == "metacopy":
            if value not in ("on", "off"):
                raise StrataError("option metacopy is on or off")
            metacopy = value == "on"
        elif key == "passthrough":
            if value not in ("auto", "on", "off"):
                raise StrataError("option passthrough is auto, on or off")
            passthrough = value
        elif key in RESTRICTIONS:
            restrictions.add(key)
        elif key in ("dev", "suid", "exec"):
            restrictions.discard("no" + key)  # the last one given wins, as in mount(8)
    if not lower:
        raise StrataError("lowerdir= is required")
    source = checked_source(source) if source is not None else DEFAULT_SOURCE
    if (upper is None) != (work is None):
        raise StrataError("upperdir and workdir go together")
    ownership = None
    if mappings or squash:
        maps = [
            IdMap(
                parse_ranges(mappings[f"{kind}mapping"], f"{kind}mapping")
                if f"{kind}mapping" in mappings
                else [],
                overflow_id(kind),
                squash.get(kind),
            )
            for kind in ("uid", "gid")
        ]
        ownership = Ownership(*maps)
    return OverlayRequest(
        lower,
        upper,
        work,
        mountpoint,
        foreground,
        read_only,
        warnings,
        frozenset(restrictions),
        ownership,
        metacopy,
        source,
        passthrough,
        acl,
        subtype,
        AtimePolicy(atime, nodiratime and atime is not AtimeMode.NOATIME),
    )


def run(argv: Sequence[str]) -> int:
    from .mount import MountRequest, WritableLayer, default_root, mount

    if list(argv) in (["--version"], ["-V"]):
        # As fuse-overlayfs answers: tools probe the mount program this way.
        from . import __version__

        print(f"strata-overlayfs: version {__version__}")
        return 0
    try:
        request = parse_arguments(argv)
        for warning in request.warnings:
            print(f"strata-overlayfs: warning: {warning}", file=sys.stderr)
        writable = None
        if request.upper is not None:
            assert request.work is not None
            writable = WritableLayer(request.upper, request.work)
        layers = list(reversed(request.lower_top_first))  # strata takes the lowest first
        root = os.path.abspath(default_root())
        mount(
            MountRequest(
                root,
                layers,
                request.mountpoint,
                request.foreground,
                writable,
                read_only=request.read_only,
                restrictions=request.restrictions,
                ownership=request.ownership,
                metacopy=request.metacopy,
                source=request.source,
                passthrough=request.passthrough,
                acl=request.acl,
                subtype=request.subtype,
                atime=request.atime,
            )
        )
    except StrataError as exc:
        print(error_line("strata-overlayfs", exc), file=sys.stderr)
        return 1
    except OSError as exc:
        print(error_line("strata-overlayfs", exc.strerror or exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


def options_table() -> str:
    """The README's table of fuse-overlayfs options."""
    lines = ["| option | strata | why |", "|---|---|---|"]
    for key, (verdict, reason) in OPTIONS.items():
        lines.append(f"| `{key}` | {verdict} | {reason} |")
    return "\n".join(lines)
