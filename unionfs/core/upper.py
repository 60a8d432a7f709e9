"""The writable layer on disk, kept in overlayfs's upper format.

UPPER holds changed and new files at their merged paths; deletions are
whiteouts and replaced directories are opaque, exactly as the kernel's
overlayfs writes them, so the same UPPER can be mounted by either:

  whiteout   a 0/0 character device (or, where mknod is not allowed, an empty
             `.wh.NAME` file, fuse-overlayfs's rootless form)
  opaque     PREFIX.opaque = "y" on the directory
  redirect   PREFIX.redirect = "/lower/path" on a renamed directory whose
             contents still come from the lower layers
  metacopy   PREFIX.metacopy on a file whose metadata changed but whose data
             is still the lower file's (a sparse file of the right size)

PREFIX is "trusted.overlay." (needs CAP_SYS_ADMIN) or "user.overlay."
(rootless). Strata adds PREFIX.strata.ino: the inode number the file shows,
so st_ino survives copy-up, rename and remount; overlayfs hides every PREFIX
xattr and ignores this one.

New files are built complete in WORK (data, owner, mode, xattrs) and renamed
into place, so a crash leaves either the old view or the whole new file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import stat
import struct
from collections.abc import Container, Iterator
from dataclasses import dataclass

from ..errors import StrataError
from . import overrides
from .data import can_reserve
from .layer import OPAQUE_MARKER, WHITEOUT_PREFIX, is_whiteout_device
from .paths import BeneathPaths, chmod_here, open_beneath, open_noatime
from .syscalls import linkat, renameat2

TRUSTED_PREFIX = b"trusted.overlay."
USER_PREFIX = b"user.overlay."
PRIVATE_PREFIXES = (TRUSTED_PREFIX, USER_PREFIX)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_INO = struct.Struct(">8sQ")
_AT_SYMLINK_FOLLOW = 0x400


def link_open_file(fd: int, new: bytes) -> None:
    """Give the file open as *fd* (an O_TMPFILE file) the name *new*: linkat
    through its /proc link, which needs no CAP_DAC_READ_SEARCH (os.link
    would link the /proc symlink itself)."""
    linkat(b"/proc/self/fd/%d" % fd, new, _AT_SYMLINK_FOLLOW)


def _xattr_name(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def get_xattr(path: bytes, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, _xattr_name(name), follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


@dataclass(frozen=True, slots=True)
class UpperFormat:
    """How this UPPER spells its markers."""

    prefix: bytes
    device_whiteouts: bool

    def name(self, what: bytes) -> bytes:
        return self.prefix + what


def probe_format(work: bytes, xattrs: str = "auto", whiteouts: str = "auto") -> UpperFormat:
    """Pick trusted or user xattrs and device or file whiteouts for *work*'s fs.
    Xattrs are tried on WORK itself, so a full UPPER (no block or inode left
    for a probe file) still mounts, to be read and cleaned up."""
    if xattrs == "auto":
        prefix = TRUSTED_PREFIX if _xattr_works(work, TRUSTED_PREFIX) else USER_PREFIX
    else:
        prefix = TRUSTED_PREFIX if xattrs == "trusted" else USER_PREFIX
    try:
        _try_xattr(work, prefix)
    except OSError as exc:
        if exc.errno not in _FULL:
            raise StrataError(
                f"cannot set {prefix.decode()}* xattrs in {os.fsdecode(work)}: {exc.strerror}"
            ) from exc
    device = whiteouts == "device"
    if whiteouts == "auto":
        node = os.path.join(work, b"probe-whiteout")
        with _scratch(node):
            try:
                os.mknod(node, stat.S_IFCHR | 0o000, 0)
                device = True
            except OSError as exc:
                # No inode left: who may set trusted xattrs may make devices.
                device = exc.errno in _FULL and prefix == TRUSTED_PREFIX
    return UpperFormat(prefix, device)


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _try_xattr(directory: bytes, prefix: bytes) -> None:
    name = _xattr_name(prefix + b"strata.probe")
    os.setxattr(directory, name, b"y")
    os.removexattr(directory, name)


def _xattr_works(directory: bytes, prefix: bytes) -> bool:
    try:
        _try_xattr(directory, prefix)
        return True
    except OSError as exc:
        if exc.errno in _FULL:  # cannot tell on a full filesystem: root has trusted.*
            return os.geteuid() == 0
        return False


@contextlib.contextmanager
def _scratch(path: bytes) -> Iterator[None]:
    """A probe file that is gone before and after."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@dataclass(frozen=True, slots=True)
class Beneath:
    """A file of UPPER (or, *in_work*, a shared copy in WORK) by its path
    relative to that root: opened beneath it without following any symlink,
    so a tree changed meanwhile (a directory turned into a symlink by the
    container) can make the open fail, never reach outside."""

    in_work: bool
    rel: bytes


@dataclass(frozen=True, slots=True)
class LinkCounts:
    """The counts kept on the shared copy of a hardlinked lower file."""

    shown: int  # st_nlink of the merged view (the lower count, changed by links and unlinks)
    names: int | None  # the names that use the copy; at 0 it is removed


@dataclass(slots=True)
class UpperDir:
    """One directory of UPPER: its entries and its markers."""

    entries: dict[bytes, os.stat_result]
    whiteouts: set[bytes]
    opaque: bool
    # `.wh.NAME` markers beside a real NAME (a crash between two steps).
    stale_markers: set[bytes]


@dataclass(slots=True)
class UpperNames:
    """The names of one directory of UPPER, read by `scan_dir`: each entry
    lstats itself when asked (`DirEntry.stat`, relative to the directory's
    descriptor) and knows from the listing alone whether it is a directory."""

    entries: dict[bytes, os.DirEntry[str]]
    whiteouts: set[bytes]
    stale_markers: set[bytes]
    opaque_marker: bool  # fuse-overlayfs's rootless form of an opaque directory


# WORK's directories: objects built before they are placed; shared copies of
# hardlinked lower files.
_TEMPORARIES = b"strata-tmp"
_LINKS = b"strata-links"


class UpperStore:
    """Primitive, crash-safe changes to UPPER, with temporaries in WORK."""

    def __init__(self, upper: str, work: str, fmt: UpperFormat, store_id: bytes) -> None:
        self.root = os.fsencode(upper)
        self.work = os.fsencode(work)
        self.tmp = os.path.join(self.work, _TEMPORARIES)
        # One name per copied-up hardlinked lower file, by inode number: the
        # copy all its names share, found again after a remount.
        self.links = os.path.join(self.work, _LINKS)
        # Their inode numbers, read once: only this store changes WORK, and a
        # lookup of any lower file asks whether it has such a copy.
        self._linked: set[int] | None = None
        self.nlink_xattr = fmt.name(b"strata.nlink")
        self.format = fmt
        self.store_id = store_id
        self._serial = 0
        self.ino_xattr = fmt.name(b"strata.ino")
        # The chunk map of a copy-up in progress (core/chunks.py).
        self.chunks_xattr = fmt.name(b"strata.chunks")
        self.opaque_xattrs = tuple(prefix + b"opaque" for prefix in PRIVATE_PREFIXES)
        self.redirect_xattrs = tuple(prefix + b"redirect" for prefix in PRIVATE_PREFIXES)
        self.metacopy_xattrs = tuple(prefix + b"metacopy" for prefix in PRIVATE_PREFIXES)
        self.upper_paths = BeneathPaths(self.root)
        # WORK's own paths, as UPPER's (its directories never move: nothing
        # to forget).
        self.work_paths = BeneathPaths(self.work)

    def close(self) -> None:
        self.upper_paths.close()
        self.work_paths.close()

    def open_beneath(self, place: Beneath, flags: int, *, cached_only: bool = False) -> int:
        """Open a file of UPPER or WORK by descriptor (safe in any thread);
        with *cached_only*, BlockingIOError where the open would wait for the disk."""
        root = (self.work_paths if place.in_work else self.upper_paths).top_fd
        return open_beneath(root, place.rel, flags, cached_only=cached_only)

    def link_place(self, ino: int) -> Beneath:
        return Beneath(True, b"%s/%x" % (_LINKS, ino))

    def host_path(self, place: Beneath) -> bytes:
        """A host path of *place*, for calls on the request thread."""
        return self.work_paths.path(place.rel) if place.in_work else self.path(place.rel)

    # Setup ------------------------------------------------------------------

    def recover(self) -> int:
        """Drop temporaries a killed daemon left in WORK; return how many."""
        found = 0
        if os.path.isdir(self.tmp):
            for name in os.listdir(self.tmp):
                found += 1
                path = os.path.join(self.tmp, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        os.makedirs(self.tmp, mode=0o700, exist_ok=True)
        os.makedirs(self.links, mode=0o700, exist_ok=True)
        # Copies a killed daemon did not remove. Only counted ones: an uncounted
        # copy may serve a name through a renamed directory (fsck reports it).
        for _, ino in self.unused_links(uncounted=False):
            self.drop_link(ino)
        return found

    def link_path(self, ino: int) -> bytes:
        return self.host_path(self.link_place(ino))

    def has_link(self, ino: int) -> bool:
        """Whether WORK holds the shared copy of a hardlinked file of this number."""
        if self._linked is None:
            self._linked = {ino for _, ino in self._links()}
        return ino in self._linked

    def place_link(self, temp: bytes, ino: int) -> None:
        """Make the complete copy *temp* the shared copy of file *ino*."""
        os.rename(temp, self.link_path(ino))
        if self._linked is not None:
            self._linked.add(ino)

    def _links(self) -> list[tuple[bytes, int]]:
        """The shared copies in WORK: (name, inode number)."""
        found: list[tuple[bytes, int]] = []
        if not os.path.isdir(self.links):  # a store never mounted writable
            return found
        for name in sorted(os.listdir(self.links)):
            try:
                found.append((name, int(name, 16)))
            except ValueError:
                continue
        return found

    def link_counts(self, ino: int) -> LinkCounts | None:
        raw = get_xattr(self.link_path(ino), self.nlink_xattr)
        if not raw:
            return None
        shown, _, names = raw.partition(b" ")
        return LinkCounts(int(shown), int(names) if names else None)

    def set_link_counts(self, ino: int, counts: LinkCounts) -> None:
        # A copy made before names were counted stays uncounted: writing 0
        # for it would read as "no name uses it" and drop it.
        if counts.names is None:
            value = b"%d" % counts.shown
        else:
            value = b"%d %d" % (counts.shown, counts.names)
        os.setxattr(self.link_path(ino), _xattr_name(self.nlink_xattr), value,
                    follow_symlinks=False)  # fmt: skip

    def drop_link(self, ino: int) -> None:
        """Remove a shared copy no name uses any more (open files keep their data)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.link_path(ino))
        if self._linked is not None:
            self._linked.discard(ino)

    def unused_links(self, *, uncounted: bool = True) -> list[tuple[bytes, int]]:
        """Shared copies no name uses: (name in WORK/strata-links, inode number).
        With *uncounted*, also copies from before names were counted that have
        no upper link left."""
        unused = []
        for name, ino in self._links():
            counts = self.link_counts(ino)
            names = None if counts is None else counts.names
            if names == 0 or (
                names is None and uncounted and os.lstat(self.link_path(ino)).st_nlink == 1
            ):
                unused.append((name, ino))
        return unused

    def path(self, rel: bytes) -> bytes:
        """A host path of UPPER's *rel* that one system call takes, at any
        depth, through no symlink of UPPER but the last component (ELOOP
        where a directory on the way is one now: BeneathPaths)."""
        return self.upper_paths.path(rel)

    def directory(self, rel: bytes) -> bytes:
        """A host path of UPPER's directory *rel* itself, through no symlink
        at all: for calls that act in it or follow it (BeneathPaths)."""
        return self.upper_paths.directory(rel)

    def forget_directories(self) -> None:
        """Directories of UPPER moved or went (see BeneathPaths.forget)."""
        self.upper_paths.forget()

    def temp_path(self) -> bytes:
        self._serial += 1
        return self.work_paths.path(b"%s/%d.%d" % (_TEMPORARIES, os.getpid(), self._serial))

    @contextlib.contextmanager
    def temp(self) -> Iterator[bytes]:
        """A new name in WORK to build an object under before it is placed.
        If the block fails (a full UPPER, an I/O error), whatever it built
        there is removed: a failed change leaves nothing half-made."""
        path = self.temp_path()
        try:
            yield path
        except BaseException:
            discard(path)
            raise

    @functools.cached_property
    def reserves_space(self) -> bool:
        """Whether copies can have their space allocated ahead (fallocate):
        a chunked copy-up needs it, else the file is copied whole."""
        return can_reserve(self.tmp)

    # Reading ----------------------------------------------------------------

    def at(self, rel: bytes) -> tuple[int, bytes]:
        """UPPER's *rel* as a directory descriptor and a name, for *at calls
        (the cheapest form of path): BeneathPaths.at."""
        return self.upper_paths.at(rel)

    def lstat(self, rel: bytes) -> os.stat_result | None:
        try:
            directory, name = self.upper_paths.at(rel)  # (ENOENT too where UPPER lacks the parent)
            return os.stat(name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def lstat_in(self, dir_fd: int, name: bytes) -> os.stat_result | None:
        """lstat of NAME in the upper directory open as *dir_fd* (open_directory)."""
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def has_marker_in(self, dir_fd: int, name: bytes) -> bool:
        """Whether the upper directory open as *dir_fd* holds a `.wh.NAME`
        marker (where NAME itself is not there: it hides the lower NAME)."""
        try:
            os.stat(WHITEOUT_PREFIX + name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:  # (as is_whited_out: a name too long for a marker has none)
            return False
        return True

    def open_directory(self, rel: bytes) -> int:
        """An O_PATH descriptor of the upper directory *rel*, at any depth,
        through no symlink."""
        return self.upper_paths.open_directory(rel)

    def is_whited_out(self, parent_rel: bytes, name: bytes, st: os.stat_result | None) -> bool:
        """Whether NAME in the upper dir hides the lower layers' NAME."""
        if st is not None:
            return is_whiteout_device(st)
        try:
            directory, marker = self.upper_paths.at(join(parent_rel, WHITEOUT_PREFIX + name))
            os.stat(marker, dir_fd=directory, follow_symlinks=False)
        except OSError:
            return False
        return True

    def read_dir(self, rel: bytes) -> UpperDir:
        """A directory's entries, each lstat'ed, and its markers."""
        with self.scan_dir(rel) as names:
            entries = {
                name: item.stat(follow_symlinks=False) for name, item in names.entries.items()
            }
        opaque = names.opaque_marker or self.is_opaque(rel)
        return UpperDir(entries, names.whiteouts, opaque, names.stale_markers)

    @contextlib.contextmanager
    def scan_dir(self, rel: bytes) -> Iterator[UpperNames]:
        """A directory's names and whiteouts from one pass of getdents: only
        a character device is lstat'ed here (a whiteout is one); the other
        entries lstat themselves when asked, while the block lasts. A listing
        answered in several requests asks only for the names it returns."""
        whiteouts: set[bytes] = set()
        entries: dict[bytes, os.DirEntry[str]] = {}
        opaque = False
        # By descriptor: each entry's stat is relative to it, at any depth.
        # Listing it leaves its atime alone: the mount's atime is its own.
        fd = open_noatime(self.directory(rel), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with os.scandir(fd) as listing:  # names as str: scandir of a descriptor
                for item in listing:
                    name = os.fsencode(item.name)
                    if name.startswith(WHITEOUT_PREFIX):
                        if name == OPAQUE_MARKER:
                            opaque = True
                        elif not name.startswith(b".wh..wh."):
                            whiteouts.add(name[len(WHITEOUT_PREFIX) :])
                        continue
                    plain = (
                        item.is_dir(follow_symlinks=False)
                        or item.is_file(follow_symlinks=False)
                        or item.is_symlink()
                    )
                    if not plain and is_whiteout_device(item.stat(follow_symlinks=False)):
                        whiteouts.add(name)
                    else:
                        entries[name] = item
            stale = whiteouts & entries.keys()
            whiteouts -= stale  # a real entry beats a stale marker
            yield UpperNames(entries, whiteouts, stale, opaque)
        finally:
            os.close(fd)

    def marks(self, path: bytes) -> frozenset[bytes]:
        """The overlay xattrs (markers and strata's own) *path* has, from one
        listxattr: a file met for the first time would otherwise cost a
        getxattr for each name it might have (opaque, redirect, metacopy,
        number, chunk map, in both spellings), and mostly has one of them."""
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return frozenset()
            raise
        return frozenset(key for key in map(os.fsencode, names) if key.startswith(PRIVATE_PREFIXES))

    def _marker(self, path: bytes, name: bytes, marks: Container[bytes] | None) -> bytes | None:
        """get_xattr, unless *marks* (what `marks` found) says it is not there."""
        if marks is not None and name not in marks:
            return None
        return get_xattr(path, name)

    def is_opaque(self, rel: bytes, marks: Container[bytes] | None = None) -> bool:
        path = self.path(rel)
        if any(self._marker(path, name, marks) == b"y" for name in self.opaque_xattrs):
            return True
        return os.path.lexists(self.path(join(rel, OPAQUE_MARKER)))

    def redirect(self, rel: bytes) -> bytes | None:
        return self.redirect_of(self.path(rel))

    def redirect_of(self, path: bytes, marks: Container[bytes] | None = None) -> bytes | None:
        for name in self.redirect_xattrs:
            value = self._marker(path, name, marks)
            if value:
                return value
        return None

    def is_metacopy(self, rel: bytes, marks: Container[bytes] | None = None) -> bool:
        path = self.path(rel)
        return any(self._marker(path, name, marks) is not None for name in self.metacopy_xattrs)

    def stored_ino(self, path: bytes, marks: Container[bytes] | None = None) -> int | None:
        raw = self._marker(path, self.ino_xattr, marks)
        if raw is None or len(raw) != _INO.size:
            return None
        store, ino = _INO.unpack(raw)
        return ino if store == self.store_id else None

    def set_ino(self, path: bytes, ino: int) -> None:
        try:
            os.setxattr(path, _xattr_name(self.ino_xattr), _INO.pack(self.store_id, ino),
                        follow_symlinks=False)  # fmt: skip
        except PermissionError:
            # user.* xattrs cannot sit on symlinks, fifos, sockets or devices:
            # in a rootless UPPER those get a new number at each remount.
            if self.format.prefix == TRUSTED_PREFIX:
                raise

    def set_ino_fd(self, fd: int, ino: int) -> None:
        os.setxattr(fd, _xattr_name(self.ino_xattr), _INO.pack(self.store_id, ino))

    def chunk_map(self, path: bytes, marks: Container[bytes] | None = None) -> bytes | None:
        return self._marker(path, self.chunks_xattr, marks)

    def set_chunk_map(self, fd: int, raw: bytes) -> None:
        os.setxattr(fd, _xattr_name(self.chunks_xattr), raw)

    def set_marker(self, path: bytes, what: bytes, value: bytes) -> None:
        os.setxattr(path, _xattr_name(self.format.name(what)), value, follow_symlinks=False)

    def clear_markers(self, path: bytes, names: tuple[bytes, ...]) -> None:
        for name in names:
            try:
                os.removexattr(path, _xattr_name(name), follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise

    # Changing ---------------------------------------------------------------

    @contextlib.contextmanager
    def times_kept(self, rel: bytes) -> Iterator[None]:
        """A copy-up is invisible in its directory's times: overlayfs, too,
        restores the upper parent's atime and mtime after placing a copy."""
        path = self.directory(rel)
        st = os.stat(path)
        try:
            yield
        finally:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    def place(self, temp: bytes, parent_rel: bytes, name: bytes) -> None:
        """Move a complete new object from WORK to NAME, replacing a whiteout."""
        target = self.path(join(parent_rel, name))
        st = self.lstat(join(parent_rel, name))
        if st is not None and is_whiteout_device(st):
            if stat.S_ISDIR(os.lstat(temp).st_mode):
                # A directory cannot replace a device by rename; swap, then drop it.
                renameat2(temp, target, RENAME_EXCHANGE)
                os.unlink(temp)
            else:
                os.rename(temp, target)
            return
        renameat2(temp, target, RENAME_NOREPLACE)
        self.remove_marker(parent_rel, name)

    def remove_marker(self, parent_rel: bytes, name: bytes) -> None:
        """Drop a `.wh.NAME` file marker if there is one. For a name of more
        than NAME_MAX - 4 bytes there cannot be: ENAMETOOLONG means none."""
        try:
            directory, marker = self.upper_paths.at(join(parent_rel, WHITEOUT_PREFIX + name))
            os.unlink(marker, dir_fd=directory)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENAMETOOLONG):
                raise

    def make_whiteout(self, parent_rel: bytes, name: bytes) -> None:
        """Hide the lower layers' NAME; whatever UPPER has at NAME is removed."""
        target = self.path(join(parent_rel, name))
        existing = self.lstat(join(parent_rel, name))
        if self.format.device_whiteouts:
            with self.temp() as temp:
                os.mknod(temp, stat.S_IFCHR | 0o000, 0)
                if existing is not None and stat.S_ISDIR(existing.st_mode):
                    renameat2(temp, target, RENAME_EXCHANGE)
                    self.forget_directories()
                    shutil.rmtree(temp)
                else:
                    os.rename(temp, target)  # atomic: the old entry or the whiteout
            return
        self.put_marker(parent_rel, name)
        if existing is not None:
            self.remove(parent_rel, name)

    def put_marker(self, parent_rel: bytes, name: bytes) -> None:
        """A `.wh.NAME` file: it hides the lower NAME once UPPER has no NAME
        (while it has one, the real entry wins, so it may come first)."""
        marker = self.path(join(parent_rel, WHITEOUT_PREFIX + name))
        os.close(os.open(marker, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000))

    def remove(self, parent_rel: bytes, name: bytes) -> None:
        """Remove NAME from UPPER (a directory with whatever markers it holds)."""
        directory, entry = self.upper_paths.at(join(parent_rel, name))
        st = os.stat(entry, dir_fd=directory, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            temp = self.temp_path()
            os.rename(entry, temp, src_dir_fd=directory)
            self.forget_directories()
            shutil.rmtree(temp)
        else:
            os.unlink(entry, dir_fd=directory)


def discard(path: bytes) -> None:
    """Remove a temporary (file or tree) if it is there; quietly, since it is
    cleaned up after an error that is the one to report."""
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def redirect_target(parent_lower: bytes | None, redirect: bytes) -> bytes:
    """The lower path a redirect names: absolute from the lower root, or
    relative to the parent's lower directory."""
    if redirect.startswith(b"/"):
        return redirect.strip(b"/")
    return join(parent_lower or b"", redirect)


def copy_metadata(
    fd: int,
    *,
    mode: int,
    uid: int,
    gid: int,
    atime_ns: int,
    mtime_ns: int,
    xattrs: tuple[tuple[bytes, bytes], ...],
) -> None:
    """Owner first (chown clears setuid and capabilities), then mode, xattrs, times.
    Rootless, an owner that cannot be set goes into the stat override."""
    overrides.set_owner(fd, mode, uid, gid)
    os.fchmod(fd, stat.S_IMODE(mode))
    for name, value in xattrs:
        os.setxattr(fd, _xattr_name(name), value)
    os.utime(fd, ns=(atime_ns, mtime_ns))


def copy_link_metadata(
    path: bytes,
    *,
    uid: int,
    gid: int,
    atime_ns: int,
    mtime_ns: int,
    xattrs: tuple[tuple[bytes, bytes], ...],
    mode: int | None = None,
) -> None:
    """Like copy_metadata for a path that may be a symlink or special file."""
    overrides.set_owner(path, stat.S_IFLNK if mode is None else mode, uid, gid)
    if mode is not None:
        chmod_here(path, stat.S_IMODE(mode))
    for name, value in xattrs:
        try:
            os.setxattr(path, _xattr_name(name), value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.EPERM:  # user.* xattrs are refused on symlinks
                raise
    os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)
