"""Mount lifecycle: checks, the background daemon, signals, unmount.

`strata mount` forks a daemon that indexes the stack, mounts, and reports
back through a pipe once the mount answers requests; the parent then exits
with the daemon's verdict, so a script can use the mountpoint right away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import xxhash

from . import native
from .core.atime import NOATIME, AccessTimes, AtimeMode, AtimePolicy
from .errors import StrataError, os_error_text

if TYPE_CHECKING:
    from .core.claim import Claim
    from .core.index import Index
    from .core.records import Entry
    from .core.streaming import StreamedLayers, StreamTree
    from .core.upper import UpperStore
    from .fuse import StrataOperations
    from .idmap import Ownership
    from .volumes import Volume

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
SUBTYPE = "strata"
FSTYPE = f"fuse.{SUBTYPE}"

Notify = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class WritableLayer:
    upper: str
    work: str
    xattrs: str = "auto"  # trusted, user
    whiteouts: str = "auto"  # device, file


# What a mount shows as its source (findmnt, df) unless given one.
DEFAULT_SOURCE = "strata"


@dataclass(frozen=True, slots=True)
class MountRequest:
    root: str
    layers: Sequence[str]
    mountpoint: str
    foreground: bool = False
    writable: WritableLayer | None = None
    # Identities of layers that never change (an image's DiffIDs): no fingerprint walk.
    known_ids: Sequence[bytes] | None = None
    # Mount read-only even with a writable layer (overlay's `ro` with an upperdir).
    read_only: bool = False
    volumes: Sequence[Volume] = ()
    # Kernel mount flags that restrict what the mount allows: nodev, nosuid, noexec.
    restrictions: frozenset[str] = frozenset()
    # How stored owners are shown (strata-overlayfs's uidmapping=, squash_to_*).
    ownership: Ownership | None = None
    # A metadata change copies no data, and large files are copied chunk by
    # chunk, so UPPER files can be incomplete while mounted; off for tools
    # that read UPPER directly (strata-overlayfs under containers-storage).
    metacopy: bool = True
    # Layers whose files' data comes on demand (lazy pulling), fetched in
    # the background while the mount serves.
    lazy: Sequence[LazyLayerSource] = ()
    # Where to write the image files opened, in order, when the mount ends.
    record_reads: str | None = None
    # Plain layers (the image's top ones) that stream in while the mount serves.
    stream: LayerStreamSource | None = None
    # The mount's source as findmnt, df and umount show it (fsname=).
    source: str = DEFAULT_SOURCE
    # Its type is fuse.SUBTYPE; empty, plain `fuse` (strata-overlayfs's subtype=).
    subtype: str = SUBTYPE
    # When files of the container layer get a new atime (core/atime.py).
    atime: AtimePolicy = NOATIME
    # FUSE passthrough (passthrough.py): "auto" uses it where the kernel,
    # libfuse and privileges allow, "on" refuses to mount without it, "off".
    passthrough: str = "auto"
    # The kernel checks POSIX ACLs (False: mode bits only, strata-overlayfs's
    # noacl); new objects inherit default ACLs either way.
    acl: bool = True


class LazyLayerSource(Protocol):
    """A lazily pulled layer as the mount uses it (lazy/layers.py's LazyLayer)."""

    layer_dir: str

    def needs(self, path: bytes) -> bool: ...

    def ensure(self, path: bytes) -> None: ...

    def run_background(self, stop: threading.Event) -> None: ...


class StreamedLayerPlace(Protocol):
    work_dir: str  # where it unpacks, served from the start
    layer_dir: str  # where it is stored once whole (one of MountRequest.layers)


class LayerStreamSource(Protocol):
    """Plain layers streamed into the mount (lazy/streaming.py's LayerStream)."""

    @property
    def layers(self) -> Sequence[StreamedLayerPlace]: ...

    @property
    def timeout(self) -> float: ...

    def run(
        self,
        record: Callable[[int, bytes, int], None],
        finish: Callable[[int], None],
        fail: Callable[[str], None],
        progress: Callable[[], None],
        stop: threading.Event,
    ) -> None: ...


def default_root() -> str:
    """The store's directory where no --root says: $STRATA_ROOT, else
    /var/lib/strata for root, else the user's data directory."""
    env = os.environ.get("STRATA_ROOT")
    if env:
        return env
    if os.geteuid() == 0 and os.access("/var/lib", os.W_OK):  # not root of a user namespace
        return "/var/lib/strata"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "strata")


def default_work_dir(upper: str) -> str:
    """WORK beside UPPER (it must be on the same filesystem, and not inside it)."""
    upper = os.path.abspath(upper).rstrip("/")
    return os.path.join(os.path.dirname(upper), "." + os.path.basename(upper) + ".work")


def check_writable_layer(layer: WritableLayer) -> WritableLayer:
    """UPPER must be a directory; WORK is made if missing, on UPPER's filesystem."""
    upper = os.path.realpath(layer.upper)
    if not os.path.isdir(upper):
        raise StrataError(f"upper directory {layer.upper} does not exist or is not a directory")
    try:
        os.makedirs(layer.work, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StrataError(f"cannot create work directory {layer.work}: {exc.strerror}") from exc
    work = os.path.realpath(layer.work)
    if not os.path.isdir(work):
        raise StrataError(f"work directory {layer.work} is not a directory")
    if os.stat(upper).st_dev != os.stat(work).st_dev:
        raise StrataError(f"work directory {work} must be on the same filesystem as {upper}")
    if upper == work or work.startswith(upper + "/") or upper.startswith(work + "/"):
        raise StrataError("upper and work directories must not contain each other")
    return WritableLayer(upper, work, layer.xattrs, layer.whiteouts)


@dataclass(frozen=True, slots=True)
class MountInfo:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor", names the FUSE connection


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mount(mountpoint: str) -> MountInfo | None:
    """The topmost mount at exactly *mountpoint*, if any."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            head, _, tail = line.partition(" - ")
            fields = head.split()
            if len(fields) < 5 or _unescape(fields[4]) != mountpoint:
                continue
            fstype, source = ([*tail.split(), "", ""])[:2]
            found = MountInfo(mountpoint, fstype, _unescape(source), fields[2])
    return found


def check_mountpoint(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StrataError(f"mountpoint {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise StrataError(f"mountpoint {path} is not a directory")
    real = os.path.realpath(path)
    if is_strata_mount(find_mount(real)):
        raise StrataError(f"{real} is already a strata mount; run 'strata umount {real}' first")
    return real


def check_fuse_device() -> None:
    try:
        st = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        raise StrataError(
            f"{FUSE_DEVICE} does not exist: load the fuse module or add the device"
        ) from None
    if not stat.S_ISCHR(st.st_mode):
        raise StrataError(f"{FUSE_DEVICE} is not a character device")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise StrataError(f"no permission to use {FUSE_DEVICE}")


RUNTIME_DIR_HELP = (
    "pid files of mounts live in /run/strata (root), else $XDG_RUNTIME_DIR/strata,"
    " else $TMPDIR/strata-UID (TMPDIR defaults to /tmp)"
)


def runtime_dir() -> str:
    """Where pid files live (RUNTIME_DIR_HELP): the first writable of the three."""
    # Root of a user namespace is uid 0 but cannot write /run.
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return "/run/strata"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return os.path.join(xdg, "strata")
    tmp = os.environ.get("TMPDIR")
    if not (tmp and os.path.isdir(tmp) and os.access(tmp, os.W_OK)):
        tmp = "/tmp"
    return os.path.join(tmp, f"strata-{os.geteuid()}")


def is_strata_mount(mounted: MountInfo | None) -> bool:
    """Whether a mount is strata's: fuse.strata, or another FUSE type
    (strata-overlayfs's subtype=) whose daemon left its pid file."""
    if mounted is None:
        return False
    return mounted.fstype == FSTYPE or (
        mounted.fstype.split(".")[0] == "fuse" and os.path.exists(pid_file(mounted.mountpoint))
    )


def pid_file(mountpoint: str) -> str:
    return os.path.join(runtime_dir(), xxhash.xxh64_hexdigest(os.fsencode(mountpoint)) + ".pid")


# Mount flags a user may ask for; the kernel enforces them on the FUSE mount
# as on any filesystem (nosuid: set-id bits and file capabilities give nothing).
RESTRICTIONS = ("nodev", "nosuid", "noexec")


def restrictions_of(args: object) -> frozenset[str]:
    """The restrictions a parsed command line asks for (its --nodev, ...)."""
    return frozenset(flag for flag in RESTRICTIONS if getattr(args, flag, False))


def atime_of(args: object) -> AtimePolicy:
    """The atime policy a parsed command line asks for (its --atime, --nodiratime)."""
    mode = AtimeMode(getattr(args, "atime", "noatime"))
    nodiratime = bool(getattr(args, "nodiratime", False))
    if nodiratime and mode is AtimeMode.NOATIME:
        raise StrataError("--nodiratime goes with --atime relatime or strictatime")
    return AtimePolicy(mode, nodiratime)


def checked_source(source: str) -> str:
    """A mount source (fsname=) libfuse and /proc/mounts take as it is."""
    if not source or not source.isascii() or not source.isprintable() or " " in source:
        raise StrataError(f"the mount's source must be printable ASCII without spaces: {source!r}")
    return source


def checked_subtype(subtype: str) -> str:
    """A mount's subtype (fuse.SUBTYPE in /proc/mounts), or none."""
    if not re.fullmatch(r"[A-Za-z0-9._-]*", subtype):
        raise StrataError(
            f"the mount's subtype may hold only letters, digits, '.', '_' and '-': {subtype!r}"
        )
    return subtype


def fuse_options(
    read_only: bool,
    restrictions: frozenset[str] = frozenset(),
    source: str = DEFAULT_SOURCE,
    subtype: str = SUBTYPE,
    atime: AtimePolicy = NOATIME,
) -> set[str]:
    escaped = (
        checked_source(source).replace("\\", "\\\\").replace(",", "\\,")
    )  # libfuse splits at commas
    options = {f"fsname={escaped}", "default_permissions"}
    options.update(NOATIME.fuse_options() if read_only else atime.fuse_options())
    if checked_subtype(subtype):
        options.add(f"subtype={subtype}")  # without one the kernel shows plain `fuse`
    if read_only:
        options.add("ro")
    if os.geteuid() == 0:
        # As fuse-overlayfs does: other users (and containers) see the mount,
        # with the kernel checking permissions; device nodes and setuid
        # binaries of an image work as on any root filesystem, unless asked not to.
        options.add("allow_other")
        options.update(allowed for allowed in ("dev", "suid") if "no" + allowed not in restrictions)
    options.update(restrictions)
    return options


def mount(request: MountRequest) -> None:
    """Mount and return once it serves (or serve in the foreground until unmounted)."""
    mountpoint = check_mountpoint(request.mountpoint)
    check_fuse_device()
    from .core.stack import check_layer_dir

    # Checked before anything is written; absolute because the daemon leaves
    # the caller's working directory.
    coming = {layer.layer_dir for layer in request.stream.layers} if request.stream else set()
    layers = [
        os.path.abspath(layer) if layer in coming else check_layer_dir(layer)
        for layer in request.layers
    ]
    writable = request.writable
    if writable is not None:
        writable = check_writable_layer(writable)
        for layer in layers:
            if writable.upper == layer or layer.startswith(writable.upper + "/"):
                raise StrataError(f"the upper directory must not hold the layer {layer}")
    unknown = request.restrictions - set(RESTRICTIONS)
    if unknown:
        raise StrataError(f"unknown mount restriction {', '.join(sorted(unknown))}")
    request = replace(request, layers=layers, mountpoint=mountpoint, writable=writable)
    if request.foreground:
        if request.volumes:
            raise StrataError("--volume needs a background mount (leave out -f)")
        _configure_logging()
        serve(request, notify=_print_progress)
        return
    _mount_in_background(request)
    if request.volumes:
        from .volumes import attach

        try:
            attach(mountpoint, list(request.volumes), pid_file(mountpoint))
        except BaseException:
            unmount(mountpoint)
            raise


def _print_progress(message: str) -> None:
    # Progress is for people watching; scripts get errors only.
    if message != "ready" and sys.stderr.isatty():
        print(message, file=sys.stderr)


def _mount_in_background(request: MountRequest) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        code = 1
        report = os.fdopen(write_end, "w", buffering=1)

        def notify(message: str) -> None:
            with contextlib.suppress(OSError):  # the parent may be gone; keep serving
                report.write(message.replace("\n", " ") + "\n")

        try:
            try:
                os.setsid()
                os.chdir("/")  # never keep the caller's directory busy
                _detach_stdio(request)
                serve(request, notify)
                code = 0
            except StrataError as exc:
                notify(f"error:{exc}")
            except OSError as exc:  # the machine's (a full disk): its one line
                notify(f"error:{os_error_text(exc)}")
            except BaseException as exc:  # report, never leave the parent waiting
                log.exception("daemon failed")
                notify(f"error:the mount daemon failed: {exc!r}")
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as replies:
        for line in replies:
            line = line.rstrip("\n")
            if line == "ready":
                return
            if line.startswith("error:"):
                os.waitpid(pid, 0)
                raise StrataError(line[len("error:") :])
            _print_progress(line)
    os.waitpid(pid, 0)
    raise StrataError("the mount daemon exited before the mount was ready")


def _detach_stdio(request: MountRequest) -> None:
    log_dir = os.path.join(request.root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(
        log_dir, xxhash.xxh64_hexdigest(os.fsencode(request.mountpoint)) + ".log"
    )
    null = os.open(os.devnull, os.O_RDWR)
    logfile = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(logfile, 2)
    os.close(null)
    os.close(logfile)
    _configure_logging()


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s strata[%(process)d] %(levelname)s %(message)s"
    )


def _raise_descriptor_limit() -> None:
    """As many descriptors as the hard limit allows: every file a container
    keeps open holds one here, besides those of the upper directories kept
    open to look names up in (core/reading.py)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(request: MountRequest, notify: Notify) -> None:
    """Index the stack, mount it and serve until unmounted or signalled."""
    import pyfuse3

    from .core.index import Index
    from .core.stack import prepare_stack
    from .core.view import UnionView
    from .fuse import StrataOperations

    _raise_descriptor_limit()
    index = Index(os.path.join(request.root, "index"))
    try:
        streaming: StreamedLayers | None = None
        if request.stream is None:
            stack = prepare_stack(
                index, request.layers, progress=notify, known_ids=request.known_ids
            )
            if stack.merged_layers:
                rate = stack.merged_files / max(stack.seconds, 1e-6)
                notify(
                    f"indexed {stack.merged_files} files in {stack.seconds:.2f} s"
                    f" ({rate:.0f} files/s)"
                )
            root, layers = stack.root, stack.layers
        else:
            streaming, trees, layers = _streamed_stack(index, request, notify)
            root = streaming.root
        store = held = None
        if request.writable is not None:
            store, held = open_upper(index, request.writable)
        view = UnionView(
            index,
            root,
            layers,
            store,
            metacopy=request.metacopy,
            lazy={layer.layer_dir: layer for layer in request.lazy},
            streaming=streaming,
        )
        operations = StrataOperations(view, ownership=request.ownership)
        operations.enable_acl = operations.enable_acl and request.acl
        atime = NOATIME
        if store is not None and not request.read_only and request.atime.active:
            try:
                operations.access_times = AccessTimes(
                    os.fsdecode(store.root), os.fsdecode(store.work), request.atime
                )
                atime = request.atime
            except OSError as exc:
                log.warning("atime: %s not kept, files keep their atimes: %s",
                            request.atime.describe(), exc.strerror)  # fmt: skip
        if request.passthrough != "off":
            from .passthrough import kernel_backing_files

            operations.enable_passthrough = True
            operations.backing_files = kernel_backing_files()
            # An upper file's idle backing id goes with its last name.
            view.last_name_gone = operations.backing_files.removed
        if request.record_reads is not None:
            operations.reads = {}
        try:
            pyfuse3.init(
                operations,
                request.mountpoint,
                fuse_options(
                    store is None or request.read_only,
                    request.restrictions,
                    request.source,
                    request.subtype,
                    atime,
                ),
            )
        except RuntimeError as exc:
            raise StrataError(f"cannot mount on {request.mountpoint}: {exc}") from exc
        stop = threading.Event()
        fetchers = [
            threading.Thread(target=layer.run_background, args=(stop,), daemon=True)
            for layer in request.lazy
        ]
        indexer = None
        if streaming is not None:
            assert request.stream is not None
            fetchers.append(_stream_thread(request, streaming, trees, stop))
            indexer = _StreamIndexer(index, request, streaming)
            operations.stream_finish = indexer.wait
        for fetcher in fetchers:
            fetcher.start()
        if indexer is not None:
            indexer.start()
        try:
            _serve_mounted(request, notify, operations)
            if held is not None:
                held.finishing()  # a new mount of UPPER may wait for what follows
            # Copy-ups still partial are filled now: after an unmount UPPER
            # holds whole files, for fsck, commit and overlayfs.
            for path, error in view.complete_partials():
                log.error(
                    "%s: its copy-up could not be finished (%s); it stays partial and "
                    "reads right, the next mount finishes it",
                    os.fsdecode(path), error.strerror,
                )  # fmt: skip
            if request.record_reads is not None and operations.reads is not None:
                _write_reads(request.record_reads, list(operations.reads))
        finally:
            stop.set()  # an unmount stops the fetchers; what they fetched stays
            for fetcher in fetchers:
                fetcher.join(timeout=10)
            if indexer is not None:
                indexer.stop()  # before the index closes under it
            view.close()
            if held is not None:
                held.release()  # before the interpreter winds down
            ahead = view.open_ahead
            # The tests read this line.
            log.info("open-ahead: %d of %d lower opens waited for the disk; %d files warmed",
                     ahead.cold, ahead.opens, ahead.warmed)  # fmt: skip
    finally:
        index.close()


def _streamed_stack(
    index: Index, request: MountRequest, notify: Notify
) -> tuple[StreamedLayers, list[StreamTree], dict[int, str]]:
    """The provisional lower view of a mount whose top layers stream in:
    the layers below them indexed, each streamed one an empty tree so far."""
    from .core.stack import layer_numbers, prepare_stack
    from .core.streaming import StreamedLayers, StreamTree

    assert request.stream is not None and request.known_ids is not None
    streamed = list(request.stream.layers)
    below = len(request.layers) - len(streamed)
    if [os.path.realpath(p) for p in request.layers[below:]] != [
        os.path.realpath(layer.layer_dir) for layer in streamed
    ]:
        raise StrataError("only the top layers of an image can stream in")
    base = None
    layers: dict[int, str] = {}
    if below:
        base = prepare_stack(
            index, request.layers[:below], progress=notify, known_ids=request.known_ids[:below]
        )
        layers.update(base.layers)
    numbers = layer_numbers(
        index, [layer.layer_dir for layer in streamed], request.known_ids[below:]
    )
    trees = [
        StreamTree(number, os.fsencode(layer.work_dir))
        for number, layer in zip(numbers, streamed, strict=True)
    ]
    layers.update({number: layer.work_dir for number, layer in zip(numbers, streamed, strict=True)})
    streaming = StreamedLayers(
        index,
        base.root if base is not None else None,
        trees[::-1],
        request.stream.timeout,
    )
    notify(f"serving while {len(streamed)} layers stream in")
    return streaming, trees, layers


def _stream_thread(
    request: MountRequest,
    streaming: StreamedLayers,
    trees: list[StreamTree],
    stop: threading.Event,
) -> threading.Thread:
    assert request.stream is not None

    def record(position: int, rel: bytes, mtime_ns: int) -> None:
        streaming.record(trees[position], rel, mtime_ns)

    def finish(position: int) -> None:
        streaming.finish(trees[position])

    return threading.Thread(
        target=request.stream.run,
        args=(record, finish, streaming.fail, streaming.touch, stop),
        name="stream layers",
        daemon=True,
    )


class _StreamIndexer:
    """Indexes the whole stack once every streamed layer is stored, with the
    inode numbers the mount showed meanwhile. A thread of its own, which the
    daemon joins before it closes the index: never abandoned mid-write."""

    def __init__(self, index: Index, request: MountRequest, streaming: StreamedLayers) -> None:
        self.index = index
        self.request = request
        self.streaming = streaming
        self.done = threading.Event()
        self.result: tuple[Entry, dict[int, str]] | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name="index streamed layers")

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        from .core.stack import prepare_stack

        try:
            self.streaming.wait_complete()
            if self.streaming.failed is not None:
                raise StrataError(self.streaming.failed)
            stack = prepare_stack(
                self.index,
                self.request.layers,
                known_ids=self.request.known_ids,
                presets=self.streaming.presets(),
            )
            log.info("every streamed layer is stored; indexed %d files", stack.merged_files)
            self.result = (stack.root, stack.layers)
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    def wait(self) -> tuple[Entry, dict[int, str]]:
        """The indexed root and layers (blocking); what went wrong else."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def stop(self) -> None:
        """The mount ends: index nothing more (an index under way finishes)."""
        self.streaming.fail("the mount ended")
        self.thread.join()


def _write_reads(path: str, reads: list[bytes]) -> None:
    """The record of --record-reads: one path per line, first opened first."""
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "wb") as handle:
        for rel in reads:
            if b"\n" not in rel:
                handle.write(rel + b"\n")
    os.replace(temp, path)
    log.info("recorded %d files read in %s", len(reads), path)


def check_upper(request: MountRequest, repair: bool) -> list[str]:
    """`strata fsck`: check an unmounted UPPER against its lower layers."""
    from .core.fsck import UpperChecker
    from .core.index import Index
    from .core.stack import check_layer_dir, prepare_stack

    assert request.writable is not None
    writable = check_writable_layer(request.writable)
    layers = [check_layer_dir(layer) for layer in request.layers]
    index = Index(os.path.join(request.root, "index"))
    try:
        stack = prepare_stack(index, layers)
        store, _ = open_upper(index, writable, recover=False)  # held until the process ends

        def allocate() -> int:
            with index.write() as txn:
                return index.allocate(txn, b"next_ino")

        checker = UpperChecker(index, stack.root, store, allocate, stack.layers)
        findings = checker.check(repair)
    finally:
        index.close()
    return [
        f"{finding.path}: {finding.problem}{' (repaired)' if finding.repaired else ''}"
        for finding in findings
    ]


def open_upper(
    index: Index, layer: WritableLayer, *, recover: bool = True
) -> tuple[UpperStore, Claim]:
    """Claim UPPER for this process (one mount at a time; a daemon still
    finishing after its unmount is waited for) and tidy after a crash."""
    from .core.claim import Claimed, claim
    from .core.upper import UpperStore, probe_format

    try:
        held = claim(layer.work)
    except Claimed as exc:
        if exc.finishing:
            raise StrataError(
                f"{layer.upper}: the daemon of its last mount still completes its copy-ups;"
                " mount it again once that daemon has exited"
            ) from None
        raise StrataError(f"{layer.upper} is in use by another strata mount") from None
    try:
        store = UpperStore(
            layer.upper,
            layer.work,
            probe_format(os.fsencode(layer.work), layer.xattrs, layer.whiteouts),
            index.store_id(),
        )
        if recover:
            left = store.recover()
            if left:
                log.info("removed %d unfinished copies left by an earlier daemon", left)
    except BaseException:
        held.release()
        raise
    return store, held


# Sequential reads of lower files come in requests of the readahead window:
# 1 MiB instead of the default 128 KiB costs an eighth of the round trips (a
# cold read of 256 MiB: 0.50 s -> 0.30 s here). The kernel still starts small
# and grows the window only while reads are sequential.
READAHEAD_KB = 1024


def set_readahead(device: int) -> None:
    """Widen the readahead of the mount's FUSE connection (root only; else kept)."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as handle:
            handle.write(f"{READAHEAD_KB}\n")
    except OSError as exc:
        log.debug("readahead stays as it is: %s", exc)


def _serve_mounted(request: MountRequest, notify: Notify, operations: StrataOperations) -> None:
    """Run the request loop of an initialised pyfuse3 session; always close it."""
    import pyfuse3
    import trio

    from .kernel_sync import open_kernel_sync

    terminated = False
    # Why the mount must not serve after all (`--passthrough on` without it):
    # raised once the request loop has ended, so it reaches the user as itself.
    refused: StrataError | None = None
    pidfile = pid_file(request.mountpoint)
    if operations.view.writable:
        operations.kernel_sync = open_kernel_sync(getattr(pyfuse3, "wait_quietly", None))
    try:
        os.makedirs(os.path.dirname(pidfile), exist_ok=True)
        with open(pidfile, "w") as handle:
            handle.write(f"{os.getpid()}\n")

        async def run() -> None:
            nonlocal terminated, refused
            async with trio.open_nursery() as nursery:

                async def fuse_loop() -> None:
                    await pyfuse3.main()
                    nursery.cancel_scope.cancel()

                async def signals() -> None:
                    nonlocal terminated
                    stop = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                    with trio.open_signal_receiver(*stop) as received:
                        async for _ in received:
                            terminated = True
                            pyfuse3.terminate()

                operations.background = nursery
                if operations.kernel_sync is not None:
                    nursery.start_soon(operations.kernel_sync.collect)
                if operations.stream_finish is not None:
                    nursery.start_soon(operations.follow_streams, operations.stream_finish)
                nursery.start_soon(fuse_loop)
                nursery.start_soon(signals)
                # A request through the kernel proves the mount serves.
                st = await trio.to_thread.run_sync(os.stat, request.mountpoint)
                set_readahead(st.st_dev)
                log.info("request path: %s", native.describe())
                try:
                    _start_passthrough(request, operations)
                except StrataError as exc:
                    refused, terminated = exc, True
                    nursery.cancel_scope.cancel()
                    return
                notify("ready")

        trio.run(run)
        if refused is not None:
            raise refused
    except BaseException:
        terminated = True  # unmount below rather than leave a dead mount behind
        raise
    finally:
        pyfuse3.close(unmount=terminated)
        if operations.kernel_sync is not None:
            operations.kernel_sync.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        if operations.access_times is not None:
            operations.access_times.close()
        if operations.passthrough is not None:
            operations.passthrough.close()
            files = operations.passthrough.files
            # Every backing id in use is dropped with the last release of its
            # inode: a leak shows here (the tests read this line).
            log.info("passthrough: %d backing files registered, %d still in use at the end",
                     files.registered, files.open_ids)  # fmt: skip


def _start_passthrough(request: MountRequest, operations: StrataOperations) -> None:
    """Passthrough once the kernel has initialised the mount (it agreed to it
    or not then): one line in the log where it cannot be used, and with
    `--passthrough on` no mount."""
    from .passthrough import start

    if operations.backing_files is None:
        return
    view = operations.view
    store = view.store
    passthrough, reason = start(
        operations.backing_files,
        dict(view.layer_paths),
        os.fsdecode(store.root) if store is not None else None,
        os.fsdecode(store.work) if store is not None else None,
        os.path.join(request.root, "index", "data.mdb"),
        # Streamed layers move to their place in the store once whole, after
        # the private mounts are made: their files stay with the daemon.
        lower=(store is None or request.read_only) and request.stream is None,
        atime=operations.access_times.policy if operations.access_times is not None else NOATIME,
    )
    if passthrough is None:
        if request.passthrough == "on":
            raise StrataError(f"passthrough is not available: {reason}")
        log.info("passthrough: not used: %s", reason)
        return
    operations.passthrough = passthrough
    log.info("passthrough: in use")


def unmount(mountpoint: str, *, timeout: float = 30.0) -> None:
    real = os.path.realpath(mountpoint)
    if not is_strata_mount(find_mount(real)):
        raise StrataError(f"{real} is not a strata mount")
    pid = _read_pid(pid_file(real))
    from .volumes import detach

    detach(pid_file(real))  # the volume binds first: they sit on this mount
    command = ["umount", real] if os.geteuid() == 0 else ["fusermount3", "-u", real]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise StrataError(f"cannot unmount {real}: {reason}")
    if pid is None:
        return
    # The daemon fills partial copy-ups before it exits (UPPER then holds whole
    # files): wait for it, saying why once it takes long.
    deadline = time.monotonic() + timeout
    noted = False
    while _alive(pid):
        if not noted and time.monotonic() > deadline:
            print(f"strata: {real} is unmounted; its daemon (pid {pid}) is still copying"
                  " files up, waiting for it", file=sys.stderr)  # fmt: skip
            noted = True
        time.sleep(0.02)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether *pid* still runs (a zombie has ended: its parent just has not
    waited for it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    return state not in ("Z", "X")
