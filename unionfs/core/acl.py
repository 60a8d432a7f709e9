"""POSIX ACLs as the kernel stores them in xattrs, and what a new file inherits.

With FUSE_POSIX_ACL the kernel checks access ACLs itself but leaves the
rest to the filesystem: a new object in a directory with a default ACL
gets an access ACL made from it (and a directory the default ACL too),
its mode masked by that ACL instead of the umask (posix_acl_create).
The xattr form is a little-endian version (2) and entries of tag, perm, id.
"""

from __future__ import annotations

import errno
import stat
import struct
from dataclasses import dataclass

from .nodes import FsError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"

_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF


@dataclass(slots=True)
class AclEntry:
    tag: int
    perm: int
    id: int = _UNDEFINED_ID


def parse(value: bytes) -> list[AclEntry]:
    """The entries of an ACL xattr; EIO for one the kernel would not accept
    (a layer may carry anything)."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise FsError(errno.EIO)
    if _HEADER.unpack_from(value)[0] != _VERSION:
        raise FsError(errno.EIO)
    entries = [AclEntry(*fields) for fields in _ENTRY.iter_unpack(value[_HEADER.size :])]
    tags = [entry.tag for entry in entries]
    if any(tags.count(tag) != 1 for tag in (USER_OBJ, GROUP_OBJ, OTHER)):
        raise FsError(errno.EIO)
    if tags.count(MASK) > 1 or ((USER in tags or GROUP in tags) and MASK not in tags):
        raise FsError(errno.EIO)
    if any(tag not in (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER) for tag in tags):
        raise FsError(errno.EIO)
    return entries


def encode(entries: list[AclEntry]) -> bytes:
    return _HEADER.pack(_VERSION) + b"".join(
        _ENTRY.pack(entry.tag, entry.perm, entry.id) for entry in entries
    )


@dataclass(frozen=True, slots=True)
class Inherited:
    """What a new object gets from its directory's default ACL."""

    mode: int
    access: bytes | None  # None: the ACL says no more than the mode
    default: bytes | None  # a directory's own default ACL


def inherit(default_acl: bytes, mode: int) -> Inherited:
    """posix_acl_create: the new object's permission bits are *mode*'s
    masked by the owner, group (or mask) and other entries of the default
    ACL, which in turn lose what *mode* does not grant. The umask is not
    applied: the default ACL stands in for it."""
    entries = parse(default_acl)
    bits = mode & 0o777
    equivalent = True
    group_obj = mask = None
    for entry in entries:
        if entry.tag == USER_OBJ:
            entry.perm &= (bits >> 6) | ~0o7
            bits &= (entry.perm << 6) | ~0o700
        elif entry.tag in (USER, GROUP):
            equivalent = False
        elif entry.tag == GROUP_OBJ:
            group_obj = entry
        elif entry.tag == OTHER:
            entry.perm &= bits | ~0o7
            bits &= entry.perm | ~0o7
        elif entry.tag == MASK:
            mask = entry
            equivalent = False
    group = mask if mask is not None else group_obj
    assert group is not None  # parse() requires a group entry
    group.perm &= (bits >> 3) | ~0o7
    bits &= (group.perm << 3) | ~0o070
    new_mode = (mode & ~0o777) | (bits & 0o777)
    return Inherited(
        new_mode,
        None if equivalent else encode(entries),
        default_acl if stat.S_ISDIR(mode) else None,
    )
