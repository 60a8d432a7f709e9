"""`strata mount` and `strata umount` for real: lifecycle, errors, read-only."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.layers import write
from tests.mounts import STRATA, overlay_mount, strata, strata_mount
from tests.trees import differences, snapshot
from unionfs.mount import FSTYPE, READAHEAD_KB, find_mount


def open_for_writing(path: str) -> None:
    with open(path, "w"):
        pass


def two_layers(scratch: str) -> list[str]:
    l0, l1 = os.path.join(scratch, "L0"), os.path.join(scratch, "L1")
    write(f"{l0}/etc/hostname", "base\n")
    write(f"{l0}/bin/tool", "#!/bin/sh\n", 0o755)
    write(f"{l1}/etc/hostname", "top\n")
    return [l0, l1]


def test_mount_serves_as_soon_as_the_command_returns(scratch: str) -> None:
    layers = two_layers(scratch)
    mountpoint = os.path.join(scratch, "mnt")
    os.mkdir(mountpoint)
    root = os.path.join(scratch, "store")
    strata(root, "mount", "--layer", layers[0], "--layer", layers[1], mountpoint)
    try:
        info = find_mount(mountpoint)
        assert info is not None and info.fstype == FSTYPE
        with open(f"{mountpoint}/etc/hostname") as handle:
            assert handle.read() == "top\n"
        assert sorted(os.listdir(mountpoint)) == ["bin", "etc"]
        # Sequential reads in 1 MiB requests: the connection's readahead is widened.
        device = os.stat(mountpoint).st_dev
        bdi = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
        with open(bdi) as handle:
            assert int(handle.read()) == READAHEAD_KB
    finally:
        result = strata(root, "umount", mountpoint, check=False)
    assert result.returncode == 0, result.stderr
    assert find_mount(mountpoint) is None
    assert os.listdir(mountpoint) == []


def test_the_mount_is_read_only_without_a_writable_layer(scratch: str) -> None:
    layers = two_layers(scratch)
    with strata_mount(os.path.join(scratch, "store"), layers, os.path.join(scratch, "m")) as m:
        attempts: list[Callable[[], object]] = [
            lambda: open_for_writing(f"{m}/etc/hostname"),
            lambda: open_for_writing(f"{m}/new"),
            lambda: os.mkdir(f"{m}/dir"),
            lambda: os.unlink(f"{m}/etc/hostname"),
            lambda: os.rename(f"{m}/etc", f"{m}/etc2"),
            lambda: os.chmod(f"{m}/bin/tool", 0o700),
            lambda: os.setxattr(f"{m}/bin/tool", "user.x", b"1"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as refused:
                attempt()
            assert refused.value.errno == errno.EROFS
    with open(f"{layers[1]}/etc/hostname") as handle:
        assert handle.read() == "top\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_foreground_mount_unmounts_cleanly_on_signals(scratch: str, signum: int) -> None:
    layers = two_layers(scratch)
    mountpoint = os.path.join(scratch, "mnt")
    os.mkdir(mountpoint)
    args = [arg for layer in layers for arg in ("--layer", layer)]
    command = [*STRATA, "--root", os.path.join(scratch, "store"), "mount", "-f", *args, mountpoint]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while find_mount(mountpoint) is None:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the foreground mount never appeared"
            time.sleep(0.05)
        assert sorted(os.listdir(mountpoint)) == ["bin", "etc"]
        process.send_signal(signum)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert find_mount(mountpoint) is None


def _fails_cleanly(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("strata: error:") and message in lines[0], lines[0]


def test_user_mistakes_get_one_line_and_mount_nothing(scratch: str) -> None:
    layers = two_layers(scratch)
    root = os.path.join(scratch, "store")
    mountpoint = os.path.join(scratch, "mnt")
    os.mkdir(mountpoint)
    a_file = write(os.path.join(scratch, "a-file"), "x")
    missing = os.path.join(scratch, "missing")
    cases = [
        (["--layer", missing, mountpoint], "No such file"),
        (["--layer", a_file, mountpoint], "not a directory"),
        (["--layer", layers[0], missing], "No such file"),
        (["--layer", layers[0], a_file], "not a directory"),
    ]
    for args, message in cases:
        _fails_cleanly(strata(root, "mount", *args, check=False), message)
        assert find_mount(mountpoint) is None
    _fails_cleanly(strata(root, "umount", mountpoint, check=False), "not a strata mount")


def test_a_mountpoint_already_served_is_refused(scratch: str) -> None:
    layers = two_layers(scratch)
    root = os.path.join(scratch, "store")
    with strata_mount(root, layers, os.path.join(scratch, "m")) as mountpoint:
        result = strata(root, "mount", "--layer", layers[0], mountpoint, check=False)
        _fails_cleanly(result, "already a strata mount")
        assert sorted(os.listdir(mountpoint)) == ["bin", "etc"]  # the first mount still serves


def test_no_fuse_device_is_a_clear_error(scratch: str) -> None:
    layers = two_layers(scratch)
    mountpoint = os.path.join(scratch, "mnt")
    os.mkdir(mountpoint)
    # Cover /dev/fuse with a plain file in a private mount namespace of this
    # command only; the host's /dev is untouched.
    plain = write(os.path.join(scratch, "not-a-device"))
    script = f'mount --bind {plain} /dev/fuse || exit 77; exec "$@"'

    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    command = [*STRATA, "--root", os.path.join(scratch, "store"), "mount"]
    result = subprocess.run(
        [*hide, *command, "--layer", layers[0], mountpoint], capture_output=True, text=True
    )
    if result.returncode == 77:
        pytest.fail("could not hide /dev/fuse in a private mount namespace")
    _fails_cleanly(result, "/dev/fuse")
    assert find_mount(mountpoint) is None


def test_python_m_unionfs_is_the_same_command(scratch: str) -> None:
    result = subprocess.run([*STRATA, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "mount" in result.stdout


def test_telldir_and_seekdir_return_to_the_same_entries(scratch: str) -> None:
    l0, l1 = os.path.join(scratch, "L0"), os.path.join(scratch, "L1")
    for n in range(600):
        write(f"{(l0, l1)[n % 2]}/big/file-{n:04}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    name_offset = 19  # struct dirent64: d_ino 8, d_off 8, d_reclen 2, d_type 1

    def read_all(handle: int) -> list[bytes]:
        names: list[bytes] = []
        while True:
            dirent = libc.readdir(handle)
            if not dirent:
                return names
            names.append(ctypes.string_at(dirent + name_offset))

    with strata_mount(os.path.join(scratch, "store"), [l0, l1], os.path.join(scratch, "m")) as m:
        handle = libc.opendir(os.fsencode(f"{m}/big"))
        assert handle
        try:
            for _ in range(250):
                assert libc.readdir(handle)
            position = libc.telldir(handle)
            rest = read_all(handle)
            libc.seekdir(handle, position)
            assert read_all(handle) == rest
            libc.seekdir(handle, 0)
            everything = read_all(handle)
        finally:
            libc.closedir(handle)
        assert len(everything) == 602 and len(rest) == 602 - 250
        assert set(everything) == {b".", b".."} | {f"file-{n:04}".encode() for n in range(600)}


def test_symlinks_in_layers_never_lead_strata_outside(scratch: str) -> None:
    """Layers holding `etc -> /` and friends: the tree equals overlayfs's and
    strata itself never reads a host file, even when a layer is swapped for a
    symlink under a live mount."""
    secret = write(os.path.join(scratch, "host", "secret"), "host data")
    l0, l1 = os.path.join(scratch, "L0"), os.path.join(scratch, "L1")
    write(f"{l0}/etc/passwd", "layer passwd")
    write(f"{l0}/data/file", "layer data")
    os.makedirs(l1)
    os.symlink("/", f"{l1}/etc")
    os.symlink("../../..", f"{l1}/x")
    os.symlink("..", f"{l1}/up")
    os.symlink(os.path.dirname(secret), f"{l1}/host")
    with overlay_mount([l0, l1], os.path.join(scratch, "ovl")) as mounted:
        expected = snapshot(mounted)
    root = os.path.join(scratch, "store")
    with strata_mount(root, [l0, l1], os.path.join(scratch, "m")) as m:
        assert differences(expected, snapshot(m)) == []
        assert os.readlink(f"{m}/etc") == "/"
        # Swap a layer directory for a symlink to the host while mounted.
        os.rename(f"{l0}/data", f"{l0}/data.old")
        os.symlink(os.path.dirname(secret), f"{l0}/data")
        os.rename(secret, os.path.join(os.path.dirname(secret), "file"))
        # The kernel may still hold the layer file's pages (keep_cache); a
        # read that reaches the daemon opens the layer file then, and is refused.
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("3\n")
        with pytest.raises(OSError) as refused, open(f"{m}/data/file") as handle:
            handle.read()
        assert refused.value.errno in (errno.ELOOP, errno.ESTALE, errno.ENOENT)


def test_relative_paths_work_for_a_background_mount(scratch: str) -> None:
    """The daemon leaves the caller's directory; relative layer paths must still resolve."""
    two_layers(scratch)
    os.mkdir(os.path.join(scratch, "mnt"))
    command = [*STRATA, "--root", "store"]
    result = subprocess.run(
        [*command, "mount", "--layer", "L0", "--layer", "L1", "mnt"],
        cwd=scratch,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    try:
        with open(os.path.join(scratch, "mnt", "etc", "hostname")) as handle:
            assert handle.read() == "top\n"
        with open(os.path.join(scratch, "mnt", "bin", "tool")) as handle:
            assert handle.read() == "#!/bin/sh\n"
    finally:
        subprocess.run([*command, "umount", "mnt"], cwd=scratch, check=False)
    assert find_mount(os.path.join(scratch, "mnt")) is None
    assert os.path.isdir(os.path.join(scratch, "store", "index"))


def test_pid_files_go_to_tmpdir_when_nothing_else_is_writable(scratch: str) -> None:
    """A user with no /run and no XDG_RUNTIME_DIR: $TMPDIR, as `mount --help` says."""
    os.chmod(scratch, 0o755)  # the user must reach its TMPDIR
    tmpdir = os.path.join(scratch, "tmp")
    os.makedirs(tmpdir)
    os.chown(tmpdir, 1000, 1000)
    probe = "from unionfs.mount import runtime_dir; print(runtime_dir())"
    env = {"PATH": os.environ["PATH"], "TMPDIR": tmpdir, "XDG_RUNTIME_DIR": "/nonexistent"}

    def as_user() -> None:
        os.setgroups([])
        os.setresgid(1000, 1000, 1000)
        os.setresuid(1000, 1000, 1000)

    found = subprocess.run(
        [*STRATA[:1], "-c", probe], env=env, preexec_fn=as_user, capture_output=True, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True,
    )  # fmt: skip
    assert found.stdout.strip() == os.path.join(tmpdir, "strata-1000")
    env["TMPDIR"] = os.path.join(scratch, "missing")
    found = subprocess.run(
        [*STRATA[:1], "-c", probe], env=env, preexec_fn=as_user, capture_output=True, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True,
    )  # fmt: skip
    assert found.stdout.strip() == "/tmp/strata-1000"
    helped = subprocess.run([*STRATA, "mount", "--help"], capture_output=True, text=True)
    assert "$TMPDIR/strata-UID" in " ".join(helped.stdout.split())


def test_a_zombie_daemon_counts_as_ended() -> None:
    """`strata umount` waits for the daemon to end; a daemon that is its
    caller's child has ended once it is a zombie, before it is waited for."""
    from unionfs.mount import _alive

    child = subprocess.Popen(["sleep", "0"])
    deadline = time.monotonic() + 10
    while _alive(child.pid):
        assert time.monotonic() < deadline, "a zombie still counts as running"
        time.sleep(0.01)
    with open(f"/proc/{child.pid}/stat") as handle:
        assert handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    child.wait()
    assert not _alive(child.pid)
    assert _alive(os.getpid())


# The daemon takes its time after an unmount, as it does when it completes a
# partial copy-up of a large file before it lets UPPER go.
_SLOW_TO_FINISH = """
import time
from unionfs.core.view import UnionView
_complete = UnionView.complete_partials
def _slowly(self):
    time.sleep(2)
    print("slept", flush=True)
    return _complete(self)
UnionView.complete_partials = _slowly
"""


def test_a_mount_of_an_upper_just_unmounted_waits_for_its_daemon_to_finish(scratch: str) -> None:
    """umount(8) returns before the daemon has let UPPER go. A mount of the
    same UPPER right after it (as scripts and unionmount-testsuite do, as
    they may with overlayfs) waits for that daemon, where it failed with "in
    use by another strata mount" (seen under load); `strata rm` of a
    container likewise. A mount that still serves keeps UPPER to itself."""
    from tests.mounts import patched_mount

    lower = os.path.join(scratch, "lower")
    write(f"{lower}/etc/conf", "conf")
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    root = os.path.join(scratch, "store")
    writable = ("--upper", upper, "--work", work)
    log = os.path.join(scratch, "log")
    with patched_mount(scratch, lower, _SLOW_TO_FINISH, log) as (mount, daemon):
        write(f"{mount}/new", "made")
        subprocess.run(["umount", mount], check=True)
        assert daemon.poll() is None, "the daemon finished at once: nothing was tested"
        with strata_mount(root, [lower], mount, *writable):
            with open(log) as handle:
                assert "slept" in handle.read(), "the new mount did not wait for the old daemon"
            with open(f"{mount}/new") as handle:
                assert handle.read() == "made"
            other = os.path.join(scratch, "other")
            os.mkdir(other)
            refused = strata(root, "mount", "--layer", lower, *writable, other, check=False)
            assert refused.returncode == 1
            assert (
                refused.stderr.strip()
                == f"strata: error: {upper} is in use by another strata mount"
            )
            assert find_mount(other) is None
