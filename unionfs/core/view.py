"""The merged view as a filesystem sees it. Knows nothing of FUSE.

Split along the data's way through it: the read path (reading.py: inodes,
lookups, attributes, listings, contents), copy-up (copyup.py) and, here, the
changes to the namespace and to attributes that build on both.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from . import acl, fileflags, overrides
from .copyup import CopyUp
from .layer import (
    HIDDEN_XATTR_PREFIXES,
    WHITEOUT_PREFIX,
    is_whiteout_device,
)
from .nodes import Caller, FsError, Node, count_subdir
from .paths import chmod_here, truncate_here
from .reading import follows, reopen
from .records import Entry
from .syscalls import renameat2
from .upper import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    UpperStore,
    get_xattr,
    join,
    link_open_file,
)


class UnionView(CopyUp):
    """The merged view: reads, copy-up, and the changes made through it."""

    def _new_object(
        self,
        parent: Node,
        name: bytes,
        caller: Caller,
        make: Callable[[bytes], int | None],
        mode: int,
        rdev: int = 0,
    ) -> tuple[Node, int | None]:
        """Create NAME in PARENT, complete (numbered, owned, its mode and
        ACLs set) before it has its name, so that a crash leaves it whole or
        absent. Where nothing below has NAME a regular file is made unnamed in
        its directory (O_TMPFILE) and then linked there, which costs no
        rename; anything else is built in WORK and then moved in, replacing a
        whiteout in one step."""
        store = self._writable()
        if name in (b".", b"..") or name.startswith(WHITEOUT_PREFIX):
            raise FsError(errno.EINVAL if name.startswith(WHITEOUT_PREFIX) else errno.EEXIST)
        if self._resolve(parent, name) is not None:
            raise FsError(errno.EEXIST)
        self._refuse_if_protected(parent, append_allowed=True)
        self._copy_up_dir(parent)
        inherited, mode, gid = self._new_mode(parent, mode, caller)
        parent_rel = self.rel(parent)
        ino = self._allocate_ino()
        lower = self._lower_child(parent, name)
        target = store.path(join(parent_rel, name))
        new = _NewObject(ino, mode, caller.uid, gid, rdev, inherited)
        fd = None
        try:
            in_place = False
            if lower is None and stat.S_ISREG(mode):
                # No whiteout is needed, so none is replaced.
                fd = _open_unnamed(store.directory(parent_rel))
                if fd is not None:
                    try:
                        new.dress(store, target, fd)
                        link_open_file(fd, target)
                        in_place = True
                    except FileExistsError:
                        os.close(fd)  # a whiteout left where nothing lies below: replaced below
                        fd = None
            if not in_place:
                # Whatever fails (a full UPPER, no inode left) leaves nothing made.
                with store.temp() as temp:
                    fd = make(temp)
                    new.dress(store, temp, fd)
                    if stat.S_ISDIR(mode) and lower is not None:
                        store.set_marker(temp, b"opaque", b"y")  # the old lower dir stays hidden
                    store.place(temp, parent_rel, name)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        count_subdir(parent, +1 if stat.S_ISDIR(mode) else 0)
        if new.placeholder:
            shown = mode
        else:
            made = os.fstat(fd) if fd is not None else os.lstat(target)
            self.note_upper_host(made, ino)
            shown = made.st_mode
        node = Node(ino, shown, parent.ino, name)
        node.upper = True
        node.protection = 0  # (no chattr flag yet: nothing to read)
        node.no_capability = True  # (nor a file capability)
        node.opaque = stat.S_ISDIR(mode) and lower is not None
        if stat.S_ISDIR(mode):
            node.lower_path = None
            node.no_default_acl = inherited is None or inherited.default is None
            node.no_setgid = not mode & stat.S_ISGID
        self.remember(node)
        return node, fd

    def _new_mode(
        self, parent: Node, mode: int, caller: Caller
    ) -> tuple[acl.Inherited | None, int, int]:
        """What a new object in *parent* (copied up) gets: the ACLs of its
        default ACL (else the umask), its mode, and its group."""
        inherited = None
        if not stat.S_ISLNK(mode):
            default_acl = self.find_xattr(parent.ino, acl.DEFAULT)
            if default_acl is not None:
                inherited = acl.inherit(default_acl, mode)
                mode = inherited.mode
            else:
                mode &= ~(caller.umask & 0o777)
        gid = caller.gid
        if not parent.no_setgid:
            parent_st = os.stat(self._writable().directory(self.rel(parent)))
            if parent_st.st_mode & stat.S_ISGID:
                gid = parent_st.st_gid  # BSD group semantics of a setgid directory
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            else:
                parent.no_setgid = True
        return inherited, mode, gid

    def tmpfile(self, parent_ino: int, mode: int, caller: Caller) -> tuple[Node, int]:
        """O_TMPFILE: an open file with no name, made as a host O_TMPFILE in
        WORK (so nothing is left of it after a crash). It shows as a file
        whose last name went until `link` gives it one."""
        store = self._writable()
        parent = self._directory(parent_ino)
        self._refuse_if_protected(parent, append_allowed=True)
        self._copy_up_dir(parent)
        inherited, mode, gid = self._new_mode(parent, stat.S_IFREG | (mode & 0o7777), caller)
        ino = self._allocate_ino()
        # Not O_EXCL: linkat must be able to give it a name.
        fd = os.open(store.work, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            _NewObject(ino, mode, caller.uid, gid, 0, inherited).dress(store, b"", fd)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        node = Node(ino, st.st_mode, parent.ino, b"")
        node.drop_name(parent.ino, b"")
        node.upper = True
        node.protection = 0
        self._tmpfiles.add(ino)
        self._gone[ino] = self.attributes_of_open(ino, fd)
        # What holds a file open by no name (ReadPath._anchor): fchown,
        # fsetxattr and opens through /proc reach it by this descriptor.
        self._anchors[ino] = reopen(fd, os.O_PATH)
        self.remember(node)
        return node, fd

    def link_tmpfile(self, ino: int, fd: int, parent_ino: int, name: bytes) -> Node:
        """linkat of an O_TMPFILE file (*fd*, open on it): its first name."""
        store = self._writable()
        node = self.node(ino)
        parent = self._directory(parent_ino)
        if self._resolve(parent, name) is not None:
            raise FsError(errno.EEXIST)
        self._refuse_if_protected(parent, append_allowed=True)
        self._copy_up_dir(parent)
        with store.temp() as temp:
            link_open_file(fd, temp)
            store.place(temp, self.rel(parent), name)
        self._tmpfiles.discard(ino)
        self._gone.pop(ino, None)
        anchor = self._anchors.pop(ino, None)
        if anchor is not None:
            os.close(anchor)  # found by its name from now on
        node.add_name(parent.ino, name)
        node.parent, node.name = parent.ino, name
        return node

    def is_tmpfile(self, ino: int) -> bool:
        """An O_TMPFILE file no link has named yet."""
        return ino in self._tmpfiles

    def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[Node, int]:
        parent = self._directory(parent_ino)

        def make(temp: bytes) -> int:
            return os.open(temp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)

        node, fd = self._new_object(parent, name, caller, make, stat.S_IFREG | (mode & 0o7777))
        assert fd is not None
        return node, fd

    def mkdir(self, parent_ino: int, name: bytes, mode: int, caller: Caller) -> Node:
        parent = self._directory(parent_ino)

        def make(temp: bytes) -> None:
            os.mkdir(temp, 0o700)

        return self._new_object(parent, name, caller, make, stat.S_IFDIR | (mode & 0o7777))[0]

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Node:
        parent = self._directory(parent_ino)

        def make(temp: bytes) -> None:
            overrides.make_node(temp, (mode & ~0o7777) | 0o600, rdev)

        return self._new_object(parent, name, caller, make, mode, rdev)[0]

    def symlink(self, parent_ino: int, name: bytes, target: bytes, caller: Caller) -> Node:
        parent = self._directory(parent_ino)

        def make(temp: bytes) -> None:
            os.symlink(target, temp)

        return self._new_object(parent, name, caller, make, stat.S_IFLNK | 0o777)[0]

    def link(self, ino: int, parent_ino: int, name: bytes) -> Node:
        store = self._writable()
        node = self.node(ino)
        parent = self._directory(parent_ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        if self._resolve(parent, name) is not None:
            raise FsError(errno.EEXIST)
        self._refuse_if_protected(node)
        self._refuse_if_protected(parent, append_allowed=True)
        if node.partial is not None:
            self._copy_up(node, data=True)  # a second name needs whole data
        self._copy_up(node, data=False)
        if node.metacopy:
            self._pin_lower_data(node)
        self._copy_up_dir(parent)
        # Counted first: a crash in between leaves one name too many, which
        # keeps a shared copy, never one too few, which would drop it.
        self._count_link(node, +1)
        try:
            parent_rel = self.rel(parent)
            placed = False
            if self._lower_child(parent, name) is None:
                # No whiteout is needed, so none is replaced: a hard link is
                # whole the moment it is made, and is made in place.
                try:
                    os.link(self._host(node), store.path(join(parent_rel, name)))
                    placed = True
                except FileExistsError:
                    pass  # a whiteout left where nothing lies below: replaced below
            if not placed:
                with store.temp() as temp:
                    os.link(self._host(node), temp)
                    store.place(temp, parent_rel, name)
        except BaseException:
            self._count_link(node, -1)
            raise
        node.add_name(parent.ino, name)
        self.remember(node)
        return node

    def _pin_lower_data(self, node: Node) -> None:
        """Record where a metadata-only copy's data lives, as an absolute
        redirect (overlayfs does the same before it links one): the new name's
        directory need not lead to that lower file."""
        assert self.store is not None and node.lower is not None
        host = self._host(node)
        if self.store.redirect_of(host) is not None:
            return
        parent = self.nodes.get(node.parent)
        lower_path = None
        if parent is not None and parent.lower_path is not None:
            lower_path = join(parent.lower_path, node.name)
        found = self._lower_at(lower_path) if lower_path is not None else None
        if lower_path is None or found is None or found.ino != node.lower.ino:
            # No path names the data: copy it, so nothing depends on a path.
            self._copy_up(node, data=True)
            return
        self.store.set_marker(host, b"redirect", b"/" + lower_path)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        parent = self._directory(parent_ino)
        node = self.peek(parent_ino, name)
        if node is None:
            raise FsError(errno.ENOENT)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._refuse_if_protected(parent)
        self._refuse_if_protected(node)
        self._index_group(node)
        last = self._removing(node)
        self._remove(parent, name, node)
        self._uncount_link(node)
        self._removed(node, last)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        parent = self._directory(parent_ino)
        node = self.peek(parent_ino, name)
        if node is None:
            raise FsError(errno.ENOENT)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        self._refuse_if_protected(parent)  # before ENOTEMPTY, as may_delete
        self._refuse_if_protected(node)
        if not self._is_empty(node):
            raise FsError(errno.ENOTEMPTY)
        last = self._removing(node)
        self._remove(parent, name, node)
        self._removed(node, last)

    def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        store = self._writable()
        node.keep_lower()  # once whited out, its name no longer finds it
        self._copy_up_dir(parent)
        parent_rel = self.rel(parent)
        hides_lower = self._lower_child(parent, name) is not None
        upper_here = store.lstat(join(parent_rel, name)) is not None
        if hides_lower:
            store.make_whiteout(parent_rel, name)
        elif upper_here:
            store.remove(parent_rel, name)
        count_subdir(parent, -1 if node.is_dir else 0)
        node.drop_name(parent.ino, name)

    def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int
    ) -> None:
        store = self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL)
        old_parent = self._directory(old_parent_ino)
        new_parent = self._directory(new_parent_ino)
        node = self.peek(old_parent_ino, old_name)
        if node is None:
            raise FsError(errno.ENOENT)
        target = self.peek(new_parent_ino, new_name)
        if target is node:
            if (old_parent.ino, old_name) == (new_parent.ino, new_name):
                return
            if not node.is_dir:  # two names of one file: POSIX says do nothing
                return
        if new_name.startswith(WHITEOUT_PREFIX):
            raise FsError(errno.EINVAL)
        if flags & RENAME_NOREPLACE and target is not None:
            raise FsError(errno.EEXIST)
        # A name leaves the old directory (and the target's the new one):
        # neither may be append-only or immutable, nor the files moved.
        self._refuse_if_protected(old_parent)
        self._refuse_if_protected(new_parent, append_allowed=target is None)
        self._refuse_if_protected(node)
        if target is not None:
            self._refuse_if_protected(target)
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise FsError(errno.ENOENT)
            self._exchange(old_parent, old_name, node, new_parent, new_name, target)
            return
        if target is not None:
            if node.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if not node.is_dir and target.is_dir:
                raise FsError(errno.EISDIR)
            if target.is_dir and not self._is_empty(target):
                raise FsError(errno.ENOTEMPTY)
        self._prepare_move(node)
        self._name_in_upper(old_parent, old_name, node)
        replaced = None
        if target is not None and target is not node:
            self._index_group(target)
            replaced = self._removing(target)
        self._copy_up_dir(new_parent)
        old_rel = self._rel_of(old_parent, old_name)
        new_parent_rel = self.rel(new_parent)
        new_rel = join(new_parent_rel, new_name)
        new_lower = self._lower_child(new_parent, new_name)
        self._fit_at(node, new_lower, store.path(old_rel))
        if target is not None and store.lstat(new_rel) is not None and target.is_dir:
            store.remove(new_parent_rel, new_name)  # empty, or whiteouts only
        leaves_lower = self._lower_child(old_parent, old_name) is not None
        dest = store.lstat(new_rel)
        if node.is_dir and dest is not None and is_whiteout_device(dest):
            # A directory cannot replace a device by rename: swap them, and the
            # whiteout lands where the directory was, which is where one is due.
            renameat2(store.path(old_rel), store.path(new_rel), RENAME_EXCHANGE)
            if not leaves_lower:
                os.unlink(store.path(old_rel))
        elif leaves_lower and store.format.device_whiteouts:
            renameat2(store.path(old_rel), store.path(new_rel), RENAME_WHITEOUT)
        else:
            if leaves_lower:
                # The marker first: should the rename fail (a full UPPER), the
                # entry still there beats it, and the lower file stays hidden.
                store.put_marker(self.rel(old_parent), old_name)
            try:
                old_dir, old_at = store.at(old_rel)
                new_dir, new_at = store.at(new_rel)
                os.rename(old_at, new_at, src_dir_fd=old_dir, dst_dir_fd=new_dir)
            except BaseException:
                if leaves_lower:
                    store.remove_marker(self.rel(old_parent), old_name)
                raise
        store.remove_marker(new_parent_rel, new_name)
        if node.is_dir or (target is not None and target.is_dir):
            store.forget_directories()
        count_subdir(old_parent, -node.is_dir)
        count_subdir(new_parent, node.is_dir - (target is not None and target.is_dir))
        if target is not None and target is not node:
            target.drop_name(new_parent.ino, new_name)
            self._uncount_link(target)
            self._removed(target, replaced)
        self._moved(node, old_parent, old_name, new_parent, new_name)

    def _prepare_move(self, node: Node) -> None:
        """Copy up what moves: a directory alone (redirect), a file with data."""
        if node.is_dir:
            self._copy_up_dir(node)
        else:
            self._copy_up(node, data=True)

    def _fit_at(self, node: Node, new_lower: Entry | None, host: bytes) -> None:
        """Mark a moving directory so the right lower contents show at its new place."""
        assert self.store is not None
        if not node.is_dir:
            return
        if node.lower is not None and node.lower_path is not None:
            self.store.set_marker(host, b"redirect", b"/" + node.lower_path)
        elif new_lower is not None and not node.opaque:
            self.store.set_marker(host, b"opaque", b"y")
            node.opaque = True

    def _moved(
        self, node: Node, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes
    ) -> None:
        node.keep_lower()
        node.move_name(old_parent.ino, old_name, new_parent.ino, new_name)

    def _exchange(
        self,
        old_parent: Node,
        old_name: bytes,
        node: Node,
        new_parent: Node,
        new_name: bytes,
        target: Node,
    ) -> None:
        store = self._writable()
        self._prepare_move(node)
        self._prepare_move(target)
        self._name_in_upper(old_parent, old_name, node)
        self._name_in_upper(new_parent, new_name, target)
        old_rel = self._rel_of(old_parent, old_name)
        new_rel = self._rel_of(new_parent, new_name)
        self._fit_at(node, self._lower_child(new_parent, new_name), store.path(old_rel))
        self._fit_at(target, self._lower_child(old_parent, old_name), store.path(new_rel))
        renameat2(store.path(old_rel), store.path(new_rel), RENAME_EXCHANGE)
        if node.is_dir or target.is_dir:
            store.forget_directories()
        count_subdir(old_parent, target.is_dir - node.is_dir)
        count_subdir(new_parent, node.is_dir - target.is_dir)
        self._moved(node, old_parent, old_name, new_parent, new_name)
        self._moved(target, new_parent, new_name, old_parent, old_name)

    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        fd: int | None = None,
        times_given: bool = False,
    ) -> Entry:
        """Change a node's attributes; *times_given*: the times are the
        caller's own, not "now" (an append-only node refuses those)."""
        node = self.node(ino)
        if mode is not None or uid is not None or gid is not None:
            node.no_setgid = False  # (a chown may clear the bit as well)
        protection = self.protection(node)
        if protection & fileflags.IMMUTABLE_FL or (
            protection & fileflags.APPEND_FL
            and (mode is not None or uid is not None or gid is not None or size is not None
                 or times_given)
        ):  # fmt: skip
            raise FsError(errno.EPERM)
        if size is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FsError(errno.EINVAL)
            if size == 0 and (not node.upper or node.metacopy):
                self._copy_up(node, data=False)  # nothing to keep: no data moves
                self._drop_metacopy(node)
            else:
                self._copy_up(node, data=True)
        else:
            self._copy_up(node, data=False)
        # The lstat that confirms the file's name also tells the time a
        # setattr of one time keeps (chmod and chown change neither).
        found: os.stat_result | None = None
        reopened = None
        try:
            place, found = self._upper_place_stat(node)
            path: bytes | int = self._writable().host_path(place)
        except FsError as exc:
            if fd is None:  # (a truncation through a descriptor brings it)
                write = os.O_WRONLY if size is not None else os.O_RDONLY
                fd = reopened = self.reopen_anchored(node, write, exc)
            elif exc.errno != errno.ESTALE:
                raise
            path = fd  # unlinked while open: change it through the descriptor
        try:
            return self._change_attributes(node, path, fd, found, mode, uid, gid, size,
                                           atime_ns, mtime_ns)  # fmt: skip
        finally:
            if reopened is not None:
                os.close(reopened)

    def _change_attributes(
        self,
        node: Node,
        path: bytes | int,
        fd: int | None,
        found: os.stat_result | None,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        size: int | None,
        atime_ns: int | None,
        mtime_ns: int | None,
    ) -> Entry:
        """setattr's changes, made at *path* (a host path, or a descriptor of
        a file open by no name)."""
        if uid is not None or gid is not None:
            shown = self.attributes(node, found)  # (None: it lstats)
            overrides.set_owner(
                path,
                shown.mode,
                shown.uid if uid is None else uid,
                shown.gid if gid is None else gid,
                shown.rdev,
            )
        if mode is not None and not stat.S_ISLNK(node.mode):
            if isinstance(path, int):
                os.chmod(path, stat.S_IMODE(mode))
            else:
                chmod_here(path, stat.S_IMODE(mode))
            if self.rootless:
                overrides.update_mode(path, stat.S_IMODE(mode))
        if size is not None:
            if fd is not None:
                os.ftruncate(fd, size)
            elif isinstance(path, int):
                os.ftruncate(path, size)
            else:
                truncate_here(path, size)
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                if found is None or size is not None:  # (a truncation set the mtime)
                    found = os.stat(path) if isinstance(path, int) else os.lstat(path)
                atime_ns = found.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = found.st_mtime_ns if mtime_ns is None else mtime_ns
            times = (atime_ns, mtime_ns)
            if isinstance(path, int):
                os.utime(path, ns=times)
            else:
                os.utime(path, ns=times, follow_symlinks=False)
        if isinstance(path, int):
            return self.attributes_of_open(node.ino, path)
        return self.attributes(node)

    def open_for_write(self, ino: int, truncate: bool) -> int:
        """A descriptor to write the node's upper copy (data already copied up)."""
        node = self.node(ino)
        if truncate and (not node.upper or node.metacopy):
            self._copy_up(node, data=False)
            self._drop_metacopy(node)
            truncate_here(self._host(node), 0)
        elif node.partial is None:
            self._copy_up(node, data=True)
        fd = self.open_data(ino, write=True)
        if truncate:
            os.ftruncate(fd, 0)
        return fd

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        node = self.node(ino)
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise FsError(errno.EPERM)  # as overlayfs: its own xattrs are not the user's
        self._refuse_if_protected(node)
        self._copy_up(node, data=False)
        node.forget_xattrs()
        with self.upper_target(node) as target:
            os.setxattr(target, os.fsdecode(name), value, follow_symlinks=follows(target))

    def removexattr(self, ino: int, name: bytes) -> None:
        node = self.node(ino)
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise FsError(errno.ENODATA)
        self._refuse_if_protected(node)
        if not node.upper:
            self.getxattr(ino, name)  # ENODATA before anything is copied
        self._copy_up(node, data=False)
        node.forget_xattrs()
        with self.upper_target(node) as target:
            os.removexattr(target, os.fsdecode(name), follow_symlinks=follows(target))

    # chattr's append-only and immutable flags ---------------------------------

    def protection(self, node: Node) -> int:
        """The node's FS_APPEND_FL and FS_IMMUTABLE_FL (read once, then kept:
        only set_file_flags changes them, and a lower file has none)."""
        known = node.protection
        if known is None:
            known = 0
            if node.upper and self.store is not None:
                try:
                    host = self._host(node)
                except FsError:
                    host = None  # its last name went: nothing can change it by name
                if host is not None:
                    known = fileflags.from_protattr(
                        get_xattr(host, self.store.format.name(b"protattr"))
                    )
            node.protection = known
        return known

    def _refuse_if_protected(self, node: Node, *, append_allowed: bool = False) -> None:
        """EPERM for a change to an immutable node, or an append-only one
        (unless the change only adds: a write in append mode, a new name in
        an append-only directory), as the kernel refuses it on any filesystem."""
        protection = self.protection(node)
        if protection & fileflags.IMMUTABLE_FL or (
            protection & fileflags.APPEND_FL and not append_allowed
        ):
            raise FsError(errno.EPERM)

    def refuse_write(self, ino: int, *, append: bool, truncate: bool) -> None:
        """An open for writing: EPERM on an immutable file, and on an
        append-only one unless it appends (and does not truncate)."""
        self._refuse_if_protected(self.node(ino), append_allowed=append and not truncate)

    def file_flags(self, ino: int) -> int:
        return self.protection(self.node(ino))

    def set_file_flags(self, ino: int, flags: int) -> None:
        """chattr: only append-only and immutable are kept (EOPNOTSUPP for
        any other flag). The node is copied up whole first: once protected,
        nothing may fill it later."""
        store = self._writable()
        node = self.node(ino)
        if flags & ~fileflags.KEPT:
            raise FsError(errno.EOPNOTSUPP)
        if flags == self.protection(node):
            return
        if node.is_dir:
            self._copy_up_dir(node)
        else:
            self._copy_up(node, data=True)
        host = self._host(node)
        if flags:
            store.set_marker(host, b"protattr", fileflags.to_protattr(flags))
        else:
            store.clear_markers(host, (store.format.name(b"protattr"),))
        node.protection = flags


def _open_unnamed(directory: bytes) -> int | None:
    """A new regular file with no name yet in *directory* (O_TMPFILE), open
    for reading and writing; None where the filesystem cannot make one."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


class _NewObject:
    """What a new object gets before anyone sees it: its number, owner, mode
    and the ACLs its directory's default ACL gives it."""

    def __init__(
        self, ino: int, mode: int, uid: int, gid: int, rdev: int, inherited: acl.Inherited | None
    ) -> None:
        self.ino, self.mode, self.uid, self.gid, self.rdev = ino, mode, uid, gid, rdev
        self.inherited = inherited
        self.placeholder = False  # a plain file standing for a device (rootless)

    def dress(self, store: UpperStore, path: bytes, fd: int | None) -> None:
        """Number, own and chmod the object just made at *path* (open as *fd*)."""
        mode = self.mode
        if fd is not None:
            store.set_ino_fd(fd, self.ino)
        else:
            store.set_ino(path, self.ino)
        device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        self.placeholder = device and stat.S_ISREG(os.lstat(path).st_mode)
        target: bytes | int = fd if fd is not None else path
        if self.placeholder:
            overrides.write(path, overrides.StatOverride(mode, self.uid, self.gid, self.rdev))
        else:
            overrides.set_owner(target, mode, self.uid, self.gid)
        if fd is not None:
            os.fchmod(fd, stat.S_IMODE(mode))
        elif not stat.S_ISLNK(mode):
            chmod_here(path, stat.S_IMODE(mode))
        if self.inherited is not None and not self.placeholder:
            self._set_acls(target, self.inherited)

    @staticmethod
    def _set_acls(target: bytes | int, inherited: acl.Inherited) -> None:
        """Store the inherited ACLs as the host's own (after the chmod, which
        would change them): the host keeps the mode in step from then on,
        through chmod and setfacl. Made in place, the object may have got
        the host's idea of them already; what the view says replaces it."""
        wanted = ((acl.ACCESS, inherited.access), (acl.DEFAULT, inherited.default))
        for name, value in wanted:
            try:
                # (No symlink gets here: it has no ACL.)
                if value is not None:
                    os.setxattr(target, os.fsdecode(name), value)
                else:
                    os.removexattr(target, os.fsdecode(name))
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
