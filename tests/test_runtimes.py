"""strata under other tools: the fuse-overlayfs command line, mount.fuse3 and
fstab, volumes, and real runtimes (chroot, bubblewrap, runc, crun) using a
strata mount as their root filesystem."""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator

import pytest

from tests.hostile import LayoutLayer, file_entry, layer_tar, special_entry, write_layout
from tests.images import build_busybox, run
from tests.mounts import overlay_mount, strata, unmount
from tests.registry import run_registry
from tests.test_images import Mounted
from tests.trees import differences, snapshot
from unionfs.mount import find_mount

OVERLAYFS_CLI = [sys.executable, "-c", "from unionfs.overlayfs_cli import main; main()"]


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("runtimes"))


@pytest.fixture(scope="module")
def busybox_store(module_dir: str) -> str:
    layout, tag = build_busybox(f"{module_dir}/busybox")
    store = f"{module_dir}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    return store


def make_layers(top: str) -> tuple[str, str]:
    lower, top_layer = f"{top}/l1", f"{top}/l2"
    os.makedirs(f"{lower}/a/deep")
    os.makedirs(f"{top_layer}/a")
    for path, text in ((f"{lower}/a/f", "one\n"), (f"{lower}/a/deep/x", "x\n"),
                       (f"{top_layer}/a/g", "two\n"), (f"{lower}/gone", "gone\n")):  # fmt: skip
        with open(path, "w") as handle:
            handle.write(text)
    os.mknod(f"{top_layer}/gone", 0o600 | 0o020000, 0)  # an overlay whiteout
    return lower, top_layer


@contextlib.contextmanager
def named_container(store: str, scratch: str, prefix: str) -> Iterator[str]:
    """A container name for this test; the container and its layer go after."""
    name = f"{prefix}-{os.path.basename(scratch)}"
    try:
        yield name
    finally:
        strata(store, "rm", name, check=False)


def test_strata_overlayfs_is_a_drop_in(scratch: str) -> None:
    lower, top = make_layers(scratch)
    env = {**os.environ, "STRATA_ROOT": f"{scratch}/root"}
    for name in ("u", "w", "mp", "ku", "kw", "kmp"):
        os.makedirs(f"{scratch}/{name}")
    options = f"lowerdir={top}:{lower},upperdir={scratch}/u,workdir={scratch}/w"
    refused = subprocess.run(
        [*OVERLAYFS_CLI, "-o", options + ",plugins=/x.so", f"{scratch}/mp"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "plugins is not supported" in refused.stderr
    result = subprocess.run(
        [*OVERLAYFS_CLI, "-o", options + ",fsync=0,noacl", f"{scratch}/mp"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "strata-overlayfs: warning: option fsync is ignored:"
        " copy-ups are always made durable before they show (as fsync=1)\n"
    )
    try:
        kernel_options = f"upperdir={scratch}/ku,workdir={scratch}/kw"
        with overlay_mount([lower, top], f"{scratch}/kmp", options=kernel_options):
            assert (
                differences(snapshot(f"{scratch}/kmp"), snapshot(f"{scratch}/mp"), times=False)
                == []
            )
        with open(f"{scratch}/mp/a/new", "w") as handle:
            handle.write("new\n")
        assert os.path.exists(f"{scratch}/u/a/new")
    finally:
        unmount(f"{scratch}/root", f"{scratch}/mp")


def test_strata_overlayfs_upper_holds_whole_files(scratch: str) -> None:
    """containers-storage reads UPPER while the mount is up (podman commit,
    diff): by default every copy-up there is a whole file, as fuse-overlayfs
    writes; metacopy=on copies metadata only, as overlayfs's option of that name."""
    lower = f"{scratch}/lower"
    os.makedirs(lower)
    small, big = b"small\n" * 100, os.urandom(8 << 20)  # big: over the chunked size
    for name, data in (("small", small), ("big", big)):
        with open(f"{lower}/{name}", "wb") as handle:
            handle.write(data)
    env = {**os.environ, "STRATA_ROOT": f"{scratch}/root"}
    for metacopy in ("", ",metacopy=on"):
        upper, work, mnt = (f"{scratch}/{part}{metacopy[-2:]}" for part in ("u", "w", "mp"))
        for path in (upper, work, mnt):
            os.makedirs(path)
        options = f"lowerdir={lower},upperdir={upper},workdir={work}{metacopy}"
        result = subprocess.run([*OVERLAYFS_CLI, "-o", options, mnt], env=env,
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 0, result.stderr
        try:
            os.chmod(f"{mnt}/small", 0o600)
            with open(f"{mnt}/big", "r+b") as handle:
                handle.write(b"x" * 4096)
            with open(f"{upper}/big", "rb") as handle:
                upper_big = handle.read()
            with open(f"{upper}/small", "rb") as handle:
                upper_small = handle.read()
            marked = "trusted.overlay.metacopy" in os.listxattr(f"{upper}/small")
            if metacopy:
                assert marked and upper_small != small
            else:
                assert not marked and upper_small == small
                assert upper_big == b"x" * 4096 + big[4096:]
        finally:
            unmount(f"{scratch}/root", mnt)
        with open(f"{upper}/big", "rb") as handle:  # whole after the unmount either way
            assert handle.read() == b"x" * 4096 + big[4096:]


def test_mount_type_fuse_strata_and_fstab(scratch: str) -> None:
    """`mount -t fuse.strata` goes through mount.fuse3, which runs `strata
    SOURCE MOUNTPOINT -o OPTIONS` from the system PATH (tools/setup.sh links it)."""
    lower, top = make_layers(scratch)
    os.makedirs(f"{scratch}/mp")
    env = {**os.environ, "STRATA_ROOT": f"{scratch}/root"}
    options = f"lowerdir={top}:{lower},upperdir={scratch}/u,workdir={scratch}/w"
    os.makedirs(f"{scratch}/u")
    os.makedirs(f"{scratch}/w")
    mount_command = ["mount", "-t", "fuse.strata", "overlay", f"{scratch}/mp", "-o", options]
    result = subprocess.run(mount_command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    try:
        assert sorted(os.listdir(f"{scratch}/mp/a")) == ["deep", "f", "g"]
        assert not os.path.exists(f"{scratch}/mp/gone")
        assert find_mount(f"{scratch}/mp") is not None
        assert _findmnt("-n", "-o", "SOURCE", "--mountpoint", f"{scratch}/mp") == "overlay"
    finally:
        unmount(f"{scratch}/root", f"{scratch}/mp")
    # fsname= names the mount for the tools that find one by its source.
    source = f"strata-test-{os.getpid()}-{os.path.basename(scratch)}"
    command = ["strata-overlayfs", "-o", f"{options},fsname={source}", f"{scratch}/mp"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    try:
        assert _findmnt("-n", "-o", "TARGET", "--source", source) == f"{scratch}/mp"
        df = subprocess.run(
            ["df", "--output=source", f"{scratch}/mp"], capture_output=True, text=True
        )
        assert df.stdout.split()[-1] == source, df.stdout
        umount = subprocess.run(["umount", source], capture_output=True, text=True)
        assert umount.returncode == 0, umount.stderr
        assert find_mount(f"{scratch}/mp") is None
    finally:
        if find_mount(f"{scratch}/mp") is not None:
            unmount(f"{scratch}/root", f"{scratch}/mp")
    # subtype= with no name: plain `fuse`, as tools comparing a mount's type
    # with it expect (xfstests' FSTYP=fuse); strata umount still knows it.
    command = ["strata-overlayfs", "-o", f"{options},subtype=", f"{scratch}/mp"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    try:
        assert _findmnt("-n", "-o", "FSTYPE", "--mountpoint", f"{scratch}/mp") == "fuse"
        umount = subprocess.run(["strata", "umount", f"{scratch}/mp"], env=env,
                                capture_output=True, text=True)  # fmt: skip
        assert umount.returncode == 0, umount.stderr
        assert find_mount(f"{scratch}/mp") is None
    finally:
        if find_mount(f"{scratch}/mp") is not None:
            unmount(f"{scratch}/root", f"{scratch}/mp")
    with open(f"{scratch}/fstab", "w") as handle:
        handle.write(f"overlay {scratch}/mp fuse.strata {options},noauto 0 0\n")
    fstab_command = ["mount", "-T", f"{scratch}/fstab", f"{scratch}/mp"]
    result = subprocess.run(fstab_command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    try:
        with open(f"{scratch}/mp/a/g") as handle:
            assert handle.read() == "two\n"
    finally:
        unmount(f"{scratch}/root", f"{scratch}/mp")


def _findmnt(*arguments: str) -> str:
    return subprocess.run(["findmnt", *arguments], capture_output=True, text=True).stdout.strip()


def test_volumes_bypass_the_container_layer(scratch: str, busybox_store: str) -> None:
    data, config = f"{scratch}/data", f"{scratch}/config"
    os.makedirs(data)
    os.makedirs(config)
    with open(f"{config}/settings", "w") as handle:
        handle.write("setting\n")
    store = busybox_store
    with named_container(store, scratch, "vol") as name:
        volumes = ["--volume", f"{data}:/srv/data", "-v", f"{config}:/etc/app:ro"]
        with Mounted(store, f"{scratch}/mnt", "busybox", "--name", name, *volumes) as mnt:
            with open(f"{mnt}/srv/data/written", "w") as handle:
                handle.write("kept\n")
            with open(f"{mnt}/etc/app/settings") as handle:
                assert handle.read() == "setting\n"
            with pytest.raises(OSError) as refused:
                open(f"{mnt}/etc/app/new", "w").close()
            assert refused.value.errno == 30  # EROFS
            diff = strata(store, "diff", name).stdout.splitlines()
        assert "A /srv/data/written" not in diff
        upper = f"{store}/containers/{name}/upper"
        assert not os.path.exists(f"{upper}/srv/data/written")
        with open(f"{data}/written") as handle:  # outlives the mount
            assert handle.read() == "kept\n"
        escape = strata(store, "mount", "busybox", "--name", name, "-v", f"{data}:/lib/was-dir/x",
                        f"{scratch}/mnt", check=False)  # fmt: skip
        assert escape.returncode == 1 and "is a symlink" in escape.stderr
        assert find_mount(f"{scratch}/mnt") is None


# Real runtimes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_store(module_dir: str, debian_image: tuple[str, str]) -> str:
    layout, tag = debian_image
    store = f"{module_dir}/debian-store"
    strata(store, "import", f"oci:{layout}:{tag}", "debian")
    return store


def make_deb(top: str) -> str:
    """A local package: installs /usr/share/strata-probe/hello."""
    root = f"{top}/pkg"
    os.makedirs(f"{root}/DEBIAN")
    os.makedirs(f"{root}/usr/share/strata-probe")
    with open(f"{root}/DEBIAN/control", "w") as handle:
        handle.write(
            "Package: strata-probe\nVersion: 1.0\nArchitecture: all\n"
            "Maintainer: strata tests <tests@strata.invalid>\nDescription: probe\n"
        )
    with open(f"{root}/usr/share/strata-probe/hello", "w") as handle:
        handle.write("installed\n")
    run("dpkg-deb", "--build", "--root-owner-group", root, f"{top}/strata-probe.deb")
    return f"{top}/strata-probe.deb"


def container_checks(mnt: str) -> None:
    """What a container does to its root: devices, fifos, sockets, locks,
    MAP_SHARED writes, setuid and file capabilities."""
    os.mknod(f"{mnt}/dev/zero2", 0o666 | 0o020000, os.makedev(1, 5))
    with open(f"{mnt}/dev/zero2", "rb") as handle:
        assert handle.read(4) == b"\0\0\0\0"
    os.mkfifo(f"{mnt}/tmp/pipe")
    assert os.path.exists(f"{mnt}/tmp/pipe")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(f"{mnt}/tmp/sock")
        server.listen(1)
        client.connect(f"{mnt}/tmp/sock")
        peer, _ = server.accept()
        with peer:
            client.sendall(b"ping")
            assert peer.recv(4) == b"ping"
    with open(f"{mnt}/etc/hostname", "a") as first, open(f"{mnt}/etc/hostname", "a") as second:
        fcntl.flock(first, fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError):
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(first, fcntl.LOCK_UN)
        fcntl.lockf(second, fcntl.LOCK_EX)
    # A lower file written through a shared mapping after its copy-up.
    with open(f"{mnt}/etc/debian_version", "r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        with mmap.mmap(handle.fileno(), size, mmap.MAP_SHARED) as mapping:
            mapping[:4] = b"MMAP"
            mapping.flush()
    with open(f"{mnt}/etc/debian_version", "rb") as handle:
        assert handle.read(4) == b"MMAP"
    # setuid: `id` made setuid root, run as uid 1000.
    shutil.copy2(f"{mnt}/usr/bin/id", f"{mnt}/usr/local/bin/suid-id")
    os.chmod(f"{mnt}/usr/local/bin/suid-id", 0o4755)
    out = run("chroot", "--userspec=1000:1000", mnt, "/usr/local/bin/suid-id")
    assert "euid=0" in out, out
    # File capabilities survive the copy-up a chmod makes.
    capability = bytes.fromhex("0100000200040000000000000000000000000000")  # cap_net_bind_service
    os.setxattr(f"{mnt}/usr/bin/dpkg", "security.capability", capability)
    os.chmod(f"{mnt}/usr/bin/dpkg", 0o755)
    assert os.getxattr(f"{mnt}/usr/bin/dpkg", "security.capability") == capability


def test_chroot_and_dpkg_in_a_debian_container(scratch: str, debian_store: str) -> None:
    deb = make_deb(scratch)
    with named_container(debian_store, scratch, "deb") as name:
        with Mounted(debian_store, f"{scratch}/mnt", "debian", "--name", name) as mnt:
            # Dynamically linked programs run: exec, mmap of shared libraries.
            assert "sources.list.d" in run("chroot", mnt, "/bin/ls", "/etc/apt")
            shutil.copy(deb, f"{mnt}/tmp/strata-probe.deb")
            run("chroot", mnt, "/usr/bin/dpkg", "-i", "/tmp/strata-probe.deb")
            container_checks(mnt)
        with Mounted(debian_store, f"{scratch}/mnt", "debian", "--name", name) as mnt:
            status = run("chroot", mnt, "/usr/bin/dpkg-query", "-W", "-f=${Status}", "strata-probe")
            assert status == "install ok installed"
            with open(f"{mnt}/usr/share/strata-probe/hello") as handle:
                assert handle.read() == "installed\n"
            assert os.getxattr(f"{mnt}/usr/bin/dpkg", "security.capability")
        upper = f"{debian_store}/containers/{name}/upper"
        assert os.path.exists(f"{upper}/usr/share/strata-probe/hello")


def test_bubblewrap_runs_a_program_on_the_mount(scratch: str, busybox_store: str) -> None:
    with named_container(busybox_store, scratch, "bwrap") as name:
        with Mounted(busybox_store, f"{scratch}/mnt", "busybox", "--name", name) as mnt:
            script = "echo from-bwrap > /tmp/out; cat /tmp/out; cat /etc/passwd"
            out = run("bwrap", "--bind", mnt, "/", "--dev", "/dev", "--proc", "/proc",
                      "/bin/sh", "-c", script)  # fmt: skip
            assert out.startswith("from-bwrap\nroot:x:0:0")
        assert os.path.exists(f"{busybox_store}/containers/{name}/upper/tmp/out")


def oci_bundle(top: str, rootfs: str, args: list[str]) -> str:
    bundle = f"{top}/bundle"
    os.makedirs(bundle)
    run("runc", "spec", "--bundle", bundle)
    with open(f"{bundle}/config.json") as handle:
        config = json.load(handle)
    config["root"] = {"path": rootfs, "readonly": False}
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    # No network namespace setup and no cgroup limits are needed for the probe.
    with open(f"{bundle}/config.json", "w") as handle:
        json.dump(config, handle)
    return bundle


def _cgroup_hybrid() -> bool:
    """cgroup v1 controllers with an empty v2 tree at /sys/fs/cgroup/unified."""
    return os.path.isdir("/sys/fs/cgroup/unified") and find_mount("/sys/fs/cgroup") is not None


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_oci_runtime_uses_the_mount_as_rootfs(
    scratch: str, busybox_store: str, runtime: str
) -> None:
    # crun's documented flag for a sandbox without CAP_SYS_RESOURCE and cgroups.
    flags = {"runc": [], "crun": ["--cgroup-manager=disabled"]}[runtime]
    wrapper: list[str] = []
    if runtime == "crun" and _cgroup_hybrid():
        # crun refuses hybrid cgroups ("drop all controllers from cgroupv2"):
        # give it a private mount namespace where /sys/fs/cgroup is cgroup2 only.
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"', "crun"]  # fmt: skip
    with named_container(busybox_store, scratch, runtime) as name:
        try:
            with Mounted(busybox_store, f"{scratch}/mnt", "busybox", "--name", name) as mnt:
                script = "echo ran > /tmp/ran; cat /tmp/ran"
                bundle = oci_bundle(scratch, mnt, ["/bin/sh", "-c", script])
                command = [runtime, *flags, "--root", f"{scratch}/state", "run", "--bundle",
                           bundle, name]  # fmt: skip
                result = subprocess.run(
                    [*wrapper, *command], capture_output=True, text=True, timeout=120
                )
                assert result.returncode == 0, f"{runtime} failed: {result.stderr.strip()}"
                assert result.stdout == "ran\n"
            assert os.path.exists(f"{busybox_store}/containers/{name}/upper/tmp/ran")
        finally:
            subprocess.run([runtime, *flags, "--root", f"{scratch}/state", "delete", "--force",
                            name], capture_output=True)  # fmt: skip


def small_image(top: str) -> str:
    """Two layers of busybox-static (podman's own unpacker is stricter than
    the OCI spec about umoci's whiteouts beneath a replaced directory)."""
    busybox = open("/bin/busybox", "rb").read()  # noqa: SIM115 - read at once
    links = [special_entry(f"bin/{name}", tarfile.SYMTYPE, "busybox") for name in ("sh", "cat")]
    first = layer_tar(
        special_entry("bin/", tarfile.DIRTYPE),
        file_entry("bin/busybox", busybox, mode=0o755),
        *links,
        file_entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        file_entry("etc/old", b"old\n"),
        special_entry("tmp/", tarfile.DIRTYPE, mode=0o1777),
    )
    second = layer_tar(file_entry("etc/.wh.old", b""), file_entry("etc/new", b"new\n"))
    return write_layout(f"{top}/small", [LayoutLayer(first), LayoutLayer(second)])


def test_podman_with_strata_as_mount_program(scratch: str) -> None:
    """containers-storage's overlay driver runs strata-overlayfs for every
    mount: podman pulls from a local registry, runs a container (runc), and
    commits it; the committed image runs too."""
    mount_program = os.path.join(os.path.dirname(sys.executable), "strata-overlayfs")
    env = {**os.environ, "STRATA_ROOT": f"{scratch}/strata"}
    podman = ["podman", "--root", f"{scratch}/root", "--runroot", f"{scratch}/runroot",
              "--storage-driver", "overlay",
              "--storage-opt", f"overlay.mount_program={mount_program}",
              "--cgroup-manager=cgroupfs", "--events-backend=file",
              "--runtime", "runc"]  # fmt: skip
    # The sandbox's limits, as the podman documentation spells them.
    limits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096", "--network", "none"]

    def call(*args: str) -> str:
        result = subprocess.run([*podman, *args], env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"podman {args[0]} failed: {result.stderr.strip()}"
        return result.stdout

    with run_registry(f"{scratch}/registry") as registry:
        image = f"{registry.host}/small:latest"
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", small_image(scratch),
            f"docker://{image}")  # fmt: skip
        try:
            call("pull", "--quiet", "--tls-verify=false", image)
            script = "echo written > /tmp/x; cat /tmp/x /etc/new; head -1 /proc/mounts"
            out = call("run", "--name", "box", *limits, image, "/bin/sh", "-c", script)
            lines = out.splitlines()
            assert lines[:2] == ["written", "new"]
            assert lines[2].split()[2] == "fuse.strata", lines[2]
            call("commit", "--quiet", "box", "localhost/committed:v1")
            again = call("run", "--rm", *limits, "localhost/committed:v1", "/bin/cat", "/tmp/x")
            assert again == "written\n"
        finally:
            subprocess.run([*podman, "rm", "--all", "--force"], env=env, capture_output=True)
            subprocess.run([*podman, "rmi", "--all", "--force"], env=env, capture_output=True)


def test_readme_lists_every_fuse_overlayfs_option() -> None:
    """The README's option table is the one strata-overlayfs enforces."""
    from unionfs.overlayfs_cli import options_table

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as handle:
        assert options_table() in handle.read()


def test_overlayfs_options_parse_as_fuse_overlayfs_writes_them() -> None:
    from unionfs.errors import StrataError
    from unionfs.overlayfs_cli import parse_arguments

    request = parse_arguments(
        ["-o", r"lowerdir=/a\:b:/c,upperdir=/u", "-o", "workdir=/w,ro,made_up", "-f", "/mnt"]
    )
    assert request.lower_top_first == ["/a:b", "/c"]
    assert (request.upper, request.work, request.mountpoint) == ("/u", "/w", "/mnt")
    assert request.read_only and request.foreground
    assert request.warnings == ["option made_up is ignored: strata does not know this option"]
    # mount.fuse3's form: SOURCE MOUNTPOINT -o OPTIONS (dev,suid added by it).
    helper = parse_arguments(["overlay", "/mnt", "-o", "lowerdir=/l,dev,suid"])
    assert helper.mountpoint == "/mnt" and helper.upper is None and helper.warnings == []
    assert helper.source == "overlay" and request.source == "strata"  # the default
    named = parse_arguments(["overlay", "/mnt", "-o", r"lowerdir=/l,fsname=a\,b"])
    assert named.source == "a,b"
    assert named.subtype == "strata" and named.atime.describe() == "relatime"
    typed = parse_arguments(["/mnt", "-o", "lowerdir=/l,subtype=x-y,strictatime,nodiratime"])
    assert typed.subtype == "x-y" and typed.atime.describe() == "strictatime,nodiratime"
    assert parse_arguments(["/mnt", "-o", "lowerdir=/l,nodiratime,noatime"]).atime.describe() == (
        "noatime"
    )
    for bad, message in (
        (["-o", "upperdir=/u", "/mnt"], "lowerdir= is required"),
        (["-o", "lowerdir=/l,upperdir=/u", "/mnt"], "go together"),
        (["-o", "lowerdir=/l,plugins=/p.so", "/mnt"], "plugins is not supported"),
        (["-o", "lowerdir=/l,uidmapping=0:1000", "/mnt"], "STORED:SHOWN:LENGTH"),
        (["-o", "lowerdir=/l,squash_to_uid=x", "/mnt"], "squash_to_uid needs an id"),
        (["-o", "lowerdir=/l"], "no mountpoint"),
        (["-o", "lowerdir=/l,fsname=caf\u00e9", "/mnt"], "printable ASCII"),
        (["-o", "lowerdir=/l,fsname=", "/mnt"], "fsname needs a value"),
        (["-o", "lowerdir=/l,subtype=a/b", "/mnt"], "subtype may hold only"),
    ):
        with pytest.raises(StrataError, match=message):
            parse_arguments(bad)


def test_podman_run_rootfs_on_a_mount(scratch: str, busybox_store: str) -> None:
    podman = ["podman", "--root", f"{scratch}/root", "--runroot", f"{scratch}/runroot",
              "--cgroup-manager=cgroupfs", "--events-backend=file",
              "--runtime", "runc"]  # fmt: skip
    with named_container(busybox_store, scratch, "rootfs") as name:
        with Mounted(busybox_store, f"{scratch}/mnt", "busybox", "--name", name) as mnt:
            result = subprocess.run(
                [*podman, "run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
                 "--ulimit", "nproc=4096:4096", "--rootfs", mnt,
                 "/bin/sh", "-c", "echo via-rootfs > /tmp/podman; cat /tmp/podman"],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert result.returncode == 0, f"podman failed: {result.stderr.strip()}"
            assert result.stdout == "via-rootfs\n"
        assert os.path.exists(f"{busybox_store}/containers/{name}/upper/tmp/podman")


def test_other_users_are_checked_as_the_kernel_would(scratch: str, busybox_store: str) -> None:
    """As root the mount is allow_other with default_permissions: uid 1000
    reads what the modes let it and nothing else."""

    def as_user(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                               *command], capture_output=True, text=True)  # fmt: skip

    os.chmod(scratch, 0o711)
    with (
        named_container(busybox_store, scratch, "perm") as name,
        Mounted(busybox_store, f"{scratch}/mnt", "busybox", "--name", name) as mnt,
    ):
        os.chmod(mnt, 0o755)
        assert as_user("cat", f"{mnt}/etc/passwd").returncode == 0
        denied = as_user("cat", f"{mnt}/etc/shadow")  # 0640 root:42
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        refused = as_user("touch", f"{mnt}/etc/new")
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        assert as_user("touch", f"{mnt}/home/user/mine").returncode == 0  # 1000's dir
        assert os.stat(f"{mnt}/home/user/mine").st_uid == 1000
        assert as_user("touch", f"{mnt}/tmp/sticky").returncode == 0  # 1777


def test_apt_get_in_a_debian_container(scratch: str, debian_store: str) -> None:
    """apt-get update and install inside the container, when the mirror answers."""
    with named_container(debian_store, scratch, "apt") as name:
        with Mounted(debian_store, f"{scratch}/mnt", "debian", "--name", name) as mnt:
            shutil.copy("/etc/resolv.conf", f"{mnt}/etc/resolv.conf")
            update = subprocess.run(["chroot", mnt, "apt-get", "update"],
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
            if update.returncode != 0 or "Err:" in update.stdout:
                said = (update.stdout + update.stderr).strip().splitlines()[-3:]
                pytest.skip(f"the Debian mirror cannot be reached: {' | '.join(said)}")
            run("chroot", mnt, "apt-get", "install", "-y", "--no-install-recommends", "hello")
            assert run("chroot", mnt, "/usr/bin/hello").startswith("Hello, world!")
        with Mounted(debian_store, f"{scratch}/mnt", "debian", "--name", name) as mnt:
            assert run("chroot", mnt, "/usr/bin/hello").startswith("Hello, world!")
