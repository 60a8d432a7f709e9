"""The inode flags chattr sets that strata keeps: append-only and immutable.

As overlayfs does, they are not set on the upper file itself (the host
would then refuse strata's own copy-ups, renames and a container's
removal) but stored in the upper file's `PREFIX.protattr` xattr, in
overlayfs's format ('a' then 'i'), and enforced by strata on the calls the
kernel would refuse on any filesystem (FUSE leaves that to the server).
"""

from __future__ import annotations

APPEND_FL = 0x00000020  # FS_APPEND_FL
IMMUTABLE_FL = 0x00000010  # FS_IMMUTABLE_FL
KEPT = APPEND_FL | IMMUTABLE_FL

# struct fsxattr (FS_IOC_FSGETXATTR): the same two as xflags.
XFLAG_IMMUTABLE = 0x00000008
XFLAG_APPEND = 0x00000010


def from_protattr(value: bytes | None) -> int:
    """The flags a protattr value holds (an unknown letter: none, as
    overlayfs ignores such a value)."""
    flags = 0
    for letter in value or b"":
        if letter == ord("a"):
            flags |= APPEND_FL
        elif letter == ord("i"):
            flags |= IMMUTABLE_FL
        else:
            return 0
    return flags


def to_protattr(flags: int) -> bytes:
    return (b"a" if flags & APPEND_FL else b"") + (b"i" if flags & IMMUTABLE_FL else b"")


def to_xflags(flags: int) -> int:
    return (XFLAG_IMMUTABLE if flags & IMMUTABLE_FL else 0) | (
        XFLAG_APPEND if flags & APPEND_FL else 0
    )


def from_xflags(xflags: int) -> int | None:
    """The flags of *xflags*; None if it asks for any strata does not keep."""
    if xflags & ~(XFLAG_IMMUTABLE | XFLAG_APPEND):
        return None
    return (IMMUTABLE_FL if xflags & XFLAG_IMMUTABLE else 0) | (
        APPEND_FL if xflags & XFLAG_APPEND else 0
    )
