"""Copy-up: giving a lower file, directory or hardlink group its place in
UPPER, whole, as a metadata-only copy, or chunk by chunk (chunks.py)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

from . import overrides
from .chunks import CHUNKED_MIN, PartialCopy
from .data import copy_data, data_written_unseen, release_space, reserve_space
from .nodes import CopyJob, FsError, Node
from .reading import ReadPath
from .records import Entry
from .upper import LinkCounts, copy_link_metadata, copy_metadata, join

log = logging.getLogger(__name__)


class CopyUp(ReadPath):
    """The read path plus copy-up. A copy is made in WORK and renamed into
    place, or filled in place beneath a metacopy mark that stays until it is
    whole, so UPPER never passes half a copy off as whole."""

    def _copy_up_dir(self, node: Node) -> None:
        """Give a directory (and its parents) a place in UPPER, no contents."""
        store = self._writable()
        if node.upper:
            return
        parent = self.nodes[node.parent]
        self._copy_up_dir(parent)
        lower = node.lower
        assert lower is not None
        existing = store.lstat(self._rel_of(parent, node.name))
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            node.upper = True  # made meanwhile for another name of a hardlinked file
            return
        parent_rel = self.rel(parent)
        with store.temp() as temp, store.times_kept(parent_rel):
            self._copy_directory(temp, node.ino, lower)
            store.place(temp, parent_rel, node.name)
        node.upper = True

    def _copy_directory(self, temp: bytes, ino: int, lower: Entry) -> None:
        """Make *temp* a directory with the metadata of a lower one, no contents."""
        assert self.store is not None
        os.mkdir(temp, 0o700)
        self.store.set_ino(temp, ino)
        copy_link_metadata(
            temp, uid=lower.uid, gid=lower.gid, atime_ns=lower.atime_ns,
            mtime_ns=lower.mtime_ns, xattrs=lower.xattrs, mode=lower.mode,
        )  # fmt: skip

    def _copy_special(self, temp: bytes, ino: int, lower: Entry) -> None:
        """Copy a lower symlink, fifo, socket or device to *temp*."""
        assert self.store is not None
        placeholder = None
        if stat.S_ISLNK(lower.mode):
            os.symlink(lower.target, temp)
        else:
            placeholder = overrides.make_node(temp, lower.mode, lower.rdev)
        self.store.set_ino(temp, ino)
        copy_link_metadata(
            temp, uid=lower.uid, gid=lower.gid, atime_ns=lower.atime_ns,
            mtime_ns=lower.mtime_ns, xattrs=lower.xattrs,
            mode=None if stat.S_ISLNK(lower.mode) else lower.mode,
        )  # fmt: skip
        if placeholder is not None:  # rootless: a file standing for the device
            overrides.write(
                temp, overrides.StatOverride(lower.mode, lower.uid, lower.gid, lower.rdev)
            )

    def _copy_up(self, node: Node, *, data: bool, reserve: bool = False) -> None:
        """Copy a file up; without *data* a regular file becomes a metacopy
        (where metacopies are allowed), with *reserve* one whose data's space
        is allocated ahead (for a chunked copy)."""
        store = self._writable()
        data = data or not self.metacopy_allowed
        if node.is_dir:
            self._copy_up_dir(node)
            return
        node.keep_lower()  # its name will find the upper file from now on
        if node.upper:
            if node.linked:
                self._link_changed_name(node)
            if data and node.metacopy:
                job = self.prepare_copy(node)
                try:
                    self.fill(job)
                except BaseException:
                    self.abandon_copy(job)
                    raise
                self.finish_copy(job)
            return
        lower = node.lower
        assert lower is not None
        if lower.nlink > 1:
            self._copy_up_group(node)
            self._link_changed_name(node)
            return
        parent = self.nodes[node.parent]
        self._copy_up_dir(parent)
        parent_rel = self.rel(parent)
        with store.temp() as temp:
            if stat.S_ISREG(lower.mode):
                if data and lower.size:
                    self.fill(self.prepare_copy(node, temp))
                else:
                    self._metadata_copy(temp, node.ino, lower, reserve=reserve)
            else:
                self._copy_special(temp, node.ino, lower)
            with store.times_kept(parent_rel):
                store.place(temp, parent_rel, node.name)
        if stat.S_ISREG(lower.mode):
            node.metacopy = bool(lower.size) and not data
        node.upper = True
        node.version += 1

    def _metadata_copy(self, temp: bytes, ino: int, lower: Entry, *, reserve: bool) -> None:
        """Make *temp* a metadata-only copy of *lower*: sparse, full size, no
        data written; with *reserve*, the space its data will take allocated."""
        assert self.store is not None
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, lower.size)
            if reserve and lower.size:
                source = self.open_lower(lower)
                try:
                    reserve_space(fd, source, lower.size)
                finally:
                    os.close(source)
            if lower.size:
                self.store.set_marker(temp, b"metacopy", b"")
            self._finish_temp(fd, ino, lower)
        finally:
            os.close(fd)

    def _copy_up_group(self, node: Node) -> None:
        """Copy up a hardlinked lower file once, for all its names.

        The copy lives in WORK under its inode number and holds the merged link
        count; every visible name of the file is linked to it in UPPER, so the
        kernel's overlayfs reads the same UPPER alike.
        """
        store = self._writable()
        node.keep_lower()
        lower = node.lower
        assert lower is not None
        if not store.has_link(node.ino):
            with store.temp() as temp:
                if stat.S_ISREG(lower.mode):
                    self.fill(self.prepare_copy(node, temp))
                else:
                    self._copy_special(temp, node.ino, lower)
                store.place_link(temp, node.ino)
        with self.index.read() as txn:
            aliases = self.index.aliases_of(txn, node.ino)
            if store.link_counts(node.ino) is None:
                # The names the merged view shows: a lower layer may hide some
                # of the layer's links, which st_nlink still counts.
                names = sum(
                    1
                    for path in aliases
                    if (found := self.index.lookup_path(txn, self.lower_root, path)) is not None
                    and found.ino == node.ino
                )
                store.set_link_counts(node.ino, LinkCounts(lower.nlink, max(names, 1)))
        node.upper = node.linked = True
        node.metacopy = False
        node.version += 1
        for path in aliases:
            self._link_alias(node.ino, path)

    def _link_changed_name(self, node: Node) -> None:
        """Link the shared copy at the name a change to the file comes by (the
        one it was last looked up by), as overlayfs copies up that name. The
        lower paths the view shows are linked already; a name under a renamed
        directory is at none, and UPPER alone must hold the change there: an
        UPPER stacked as a lower layer has no WORK."""
        named = self.last_named.get(node.ino)
        if named is None or not node.has_name(*named):
            return
        parent = self.nodes.get(named[0])
        if parent is not None:
            self._name_in_upper(parent, named[1], node)

    def _link_alias(self, ino: int, path: bytes) -> None:
        """Link the shared copy at *path* if the merged view still shows the
        lower file there (same path, nothing above it whited out or replaced)."""
        store = self._writable()
        parts = path.split(b"/")
        directory: Entry = self.lower_root
        rel = b""
        for depth, part in enumerate(parts):
            child = join(rel, part)
            st = store.lstat(child)
            if store.is_whited_out(rel, part, st):
                return
            with self.index.read() as txn:
                entry = self.index.lookup(txn, directory.listing, part)
            if entry is None:
                return
            if depth == len(parts) - 1:
                if st is None and entry.ino == ino:
                    with store.times_kept(rel):
                        os.link(store.link_path(ino), store.path(child))
                return
            if not entry.is_dir:
                return
            if st is None:
                with store.temp() as temp, store.times_kept(rel):
                    self._copy_directory(temp, entry.ino, entry)
                    store.place(temp, rel, part)
                live = self.nodes.get(entry.ino)  # the kernel may know this directory
                if live is not None:
                    live.upper = True
            elif (
                not stat.S_ISDIR(st.st_mode)
                or store.is_opaque(child)
                or store.redirect(child) is not None
            ):
                return
            directory, rel = entry, child

    def _name_in_upper(self, parent: Node, name: bytes, node: Node) -> None:
        """Make sure UPPER holds this name of a copied-up hardlinked file."""
        store = self._writable()
        if node.linked and store.lstat(self._rel_of(parent, name)) is None:
            self._copy_up_dir(parent)
            parent_rel = self.rel(parent)
            with store.temp() as temp, store.times_kept(parent_rel):
                os.link(store.link_path(node.ino), temp)
                store.place(temp, parent_rel, name)

    def _index_group(self, node: Node) -> None:
        """Before a name of a hardlinked lower file goes, copy the file up so
        its other names keep a true link count."""
        if not node.is_dir and not node.upper and node.lower is not None and node.lower.nlink > 1:
            self._copy_up_group(node)

    def _count_link(self, node: Node, change: int) -> None:
        """Count a name more or less of a shared copy; the last name takes it."""
        if not node.linked:
            return
        assert self.store is not None
        counts = self.store.link_counts(node.ino)
        if counts is None:
            return
        names = None if counts.names is None else max(counts.names + change, 0)
        if names == 0:
            self.store.drop_link(node.ino)
            return
        self.store.set_link_counts(node.ino, LinkCounts(max(counts.shown + change, 0), names))

    def _uncount_link(self, node: Node) -> None:
        """_count_link(node, -1) once a name went. The name is gone whatever
        happens here, so the request must not fail now: a count the disk
        would not take stays one too high, which keeps the shared copy
        (never drops one in use), and is logged."""
        try:
            self._count_link(node, -1)
        except OSError as exc:
            log.warning(
                "inode %d: a name went, but its shared copy's count was not lowered (%s); "
                "the copy is kept",
                node.ino,
                exc.strerror,
            )

    def _finish_temp(self, fd: int, ino: int, lower: Entry) -> None:
        """Give a new file in WORK its inode number and the metadata of *lower*."""
        assert self.store is not None
        self.store.set_ino_fd(fd, ino)
        copy_metadata(
            fd,
            mode=lower.mode,
            uid=lower.uid,
            gid=lower.gid,
            atime_ns=lower.atime_ns,
            mtime_ns=lower.mtime_ns,
            xattrs=lower.xattrs,
        )

    def _drop_metacopy(self, node: Node) -> None:
        if node.metacopy:
            assert self.store is not None
            host = self._host(node)
            if node.partial is not None:
                node.partial.close()
                node.partial = None
                self.store.clear_markers(host, (self.store.chunks_xattr,))
            self.store.clear_markers(host, self.store.metacopy_xattrs)
            self.store.clear_markers(host, self.store.redirect_xattrs)
            node.metacopy = False
            node.version += 1

    def start_partial(self, ino: int) -> bool:
        """Make a large lower file writable without copying its data: a
        metadata-only copy whose chunks are copied as writes touch them (and
        by fill, in the background). False where the whole file is copied."""
        store = self._writable()
        node = self.node(ino)
        lower = node.lower
        if (
            node.partial is not None
            or not self.metacopy_allowed
            or lower is None
            or not stat.S_ISREG(node.mode)
            or lower.size < CHUNKED_MIN
            or lower.nlink > 1
            or node.linked
            or (node.upper and not node.metacopy)
            or not store.reserves_space
        ):
            return node.partial is not None
        # The data's space is allocated before the copy is used (a full UPPER
        # fails this open with ENOSPC, the file as it was), so filling it
        # later cannot run out of space half-way.
        reserved = not node.upper
        self._copy_up(node, data=False, reserve=reserved)
        raw = PartialCopy.empty_map(lower.size)
        partial = self._partial(lower, self._upper_place(node), raw)
        try:
            if not reserved:  # a metadata-only copy made before
                reserve_space(partial.upper_fd, partial.lower_fd, lower.size)
            store.set_chunk_map(partial.upper_fd, raw)
        except BaseException:
            partial.close()
            raise
        node.partial = partial
        return True

    def partial(self, ino: int) -> PartialCopy | None:
        node = self.nodes.get(ino)
        return node.partial if node is not None else None

    def complete_partials(self) -> list[tuple[bytes, OSError]]:
        """Fill every partial copy (at unmount: UPPER then holds whole files).
        A copy that cannot be filled now (an I/O error) stays partial, its
        chunk map saying where each part is read from; returned with its error."""
        failed = []
        for node in list(self.nodes.values()):
            if node.partial is None:
                continue
            try:
                self._copy_up(node, data=True)
            except FsError as failure:
                if failure.errno not in (errno.ENOENT, errno.ESTALE):
                    failed.append((self.rel(node), OSError(failure.errno, failure.args[1])))
                else:  # no name left (unlinked while open): nothing to keep
                    node.partial.close()
                    node.partial = None
            except OSError as exc:
                failed.append((self.rel(node), exc))
        return failed

    def needs_data_copy(self, ino: int) -> bool:
        """Whether writing to *ino* must first copy data up (a slow step)."""
        node = self.node(ino)
        if not stat.S_ISREG(node.mode) or node.lower is None:
            return False
        if node.lower.nlink > 1 and not node.upper:
            return False  # copied once for all names, by _copy_up_group
        return (not node.upper or node.metacopy) and node.lower.size > 0

    def prepare_copy(self, node: Node, temp: bytes | None = None) -> CopyJob:
        store = self._writable()
        node.keep_lower()
        lower = node.lower
        if lower is None:
            # An UPPER (or a layer that was one) whose metadata-only copy lost
            # the lower file it took its data from: nothing to copy (fsck says so).
            raise FsError(
                errno.EIO, f"{os.fsdecode(self.rel(node))}: metadata-only copy whose data is gone"
            )
        if node.upper and node.metacopy:
            fd = self._open_upper(node, os.O_WRONLY)
            return CopyJob(node.ino, lower, in_place=fd, partial=node.partial)
        return CopyJob(node.ino, lower, temp=temp if temp is not None else store.temp_path())

    def fill(self, job: CopyJob) -> None:
        """Copy the data of a job. Blocking, thread-safe."""
        assert self.store is not None
        if job.partial is not None:
            # Only the chunks it lacks (the partial copy has the lower file open).
            while job.partial.fill_next():
                pass
            os.fdatasync(job.partial.upper_fd if job.in_place is None else job.in_place)
            return
        source = self.open_lower(job.entry)
        try:
            if job.in_place is not None:
                # Until the metacopy mark goes (finish_copy), reads still come
                # from the lower file, so a half-done copy is never seen. The
                # copy looks as the metadata-only copy did. Its space first:
                # a full UPPER fails here with nothing allocated.
                reserve_space(job.in_place, source, job.entry.size)
                with data_written_unseen(job.in_place):
                    copy_data(source, job.in_place, job.entry.size)
                os.fdatasync(job.in_place)
                return
            fd = os.open(job.temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                copy_data(source, fd, job.entry.size)
                self._finish_temp(fd, job.ino, job.entry)
                os.fdatasync(fd)  # as overlayfs: the copy is durable before it is visible
            finally:
                os.close(fd)
        finally:
            os.close(source)

    def abandon_copy(self, job: CopyJob) -> None:
        """Release what a copy that failed half-way holds."""
        if job.in_place is not None:
            if job.partial is None:  # what was copied is unused: its blocks go back
                release_space(job.in_place, job.entry.size)
            os.close(job.in_place)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(job.temp)

    def finish_copy(self, job: CopyJob) -> None:
        """Make a filled copy the file's data (on the request thread, after fill)."""
        store = self._writable()
        node = self.nodes.get(job.ino)
        if job.in_place is not None:
            os.close(job.in_place)
            if job.partial is not None and (
                node is None or node.partial is not job.partial or not job.partial.complete
            ):
                return  # dropped (truncated, or the name is gone) before it was filled
            if node is not None and node.metacopy:
                self._drop_metacopy(node)
            return
        if node is None or node.upper or not node.has_name(node.parent, node.name):
            os.unlink(job.temp)  # someone else finished first, or the name is gone
            return
        parent = self.nodes[node.parent]
        self._copy_up_dir(parent)
        parent_rel = self.rel(parent)
        with store.times_kept(parent_rel):
            store.place(job.temp, parent_rel, node.name)
        node.upper = True
        node.metacopy = False
        node.version += 1
