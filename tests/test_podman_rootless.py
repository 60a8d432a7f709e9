"""strata-overlayfs where fuse-overlayfs is used most: rootless podman with ID
mappings and buildah builds. Each scenario runs twice, once with
fuse-overlayfs as containers-storage's mount program and once with
strata-overlayfs, and both must leave the same files with the same owners.

The mount program is the installed `strata-overlayfs` on the system PATH, run
by a user made for the test: it must not depend on reading the checkout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.hostile import LayoutLayer, file_entry, layer_tar, special_entry, write_layout
from tests.images import run
from tests.registry import Registry, run_registry
from tests.rootless_user import RootlessUser, rootless_user
from tests.test_runtimes import make_deb

PROGRAMS = {"fuse-overlayfs": "/usr/bin/fuse-overlayfs", "strata-overlayfs": ""}
SHOW_OWNERS = "stat -c '%n %u %g %a'"
APPLETS = ("sh", "cat", "ls", "id", "chown", "mkdir", "rm", "mv", "grep", "cut", "stat")

PASSWD = b"root:x:0:0::/root:/bin/sh\ndaemon:x:1:1::/:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
Tree = dict[str, tuple[str, int, int, str]]


def _installed_strata_overlayfs() -> str:
    found = shutil.which("strata-overlayfs", path="/usr/local/bin:/usr/bin:/bin")
    if found is None:
        pytest.fail("strata-overlayfs is not installed on the system PATH (tools/setup.sh)")
    return found


def _require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _cgroup_v2_only() -> bool:
    return os.path.exists("/sys/fs/cgroup/cgroup.controllers")


def _runtime() -> str:
    # crun refuses cgroups in hybrid mode, which this machine has; runc copes.
    return "crun" if _cgroup_v2_only() and shutil.which("crun") else "runc"


def owners_image(top: str) -> str:
    """busybox with users the containers chown to, a file an image user owns,
    and a second layer that deletes and adds."""
    busybox = open("/bin/busybox", "rb").read()  # noqa: SIM115 - read at once
    first = layer_tar(
        special_entry("bin/", tarfile.DIRTYPE),
        file_entry("bin/busybox", busybox, mode=0o755),
        *(special_entry(f"bin/{name}", tarfile.SYMTYPE, "busybox") for name in APPLETS),
        file_entry("etc/passwd", PASSWD),
        file_entry("etc/group", b"root:x:0:\ndaemon:x:1:\napp:x:1000:\n"),
        file_entry("etc/old", b"old\n"),
        special_entry("home/app/", tarfile.DIRTYPE, uid=1000, gid=1000),
        file_entry("home/app/owned", b"app's\n", uid=1000, gid=1000, mode=0o640),
        special_entry("tmp/", tarfile.DIRTYPE, mode=0o1777),
    )
    second = layer_tar(file_entry("etc/.wh.old", b""), file_entry("etc/new", b"new\n"))
    return write_layout(f"{top}/owners", [LayoutLayer(first), LayoutLayer(second)])


def host_tree(top: str) -> Tree:
    """Every entry under *top* as the host sees it: type and mode, owner, and
    the content's digest (or a link's target)."""
    tree: Tree = {}
    for path, dirs, files in os.walk(top):
        for name in dirs + files:
            full = os.path.join(path, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as handle:
                    what = hashlib.sha256(handle.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                what = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                what = ""
            tree[os.path.relpath(full, top)] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid,
                                                what)  # fmt: skip
    return tree


def without_opaque_markers(tree: Tree) -> Tree:
    return {
        rel: entry for rel, entry in tree.items() if not os.path.basename(rel).startswith(".wh..")
    }


def _containers_conf(user: RootlessUser, storage: str, program: str, registry: Registry) -> None:
    user.write(
        ".config/containers/storage.conf",
        f'[storage]\ndriver = "overlay"\ngraphroot = "{storage}/graph"\n'
        f'runroot = "{user.runtime_dir}/storage"\n'
        f'[storage.options.overlay]\nmount_program = "{program}"\n',
    )
    user.write(
        ".config/containers/containers.conf",
        '[containers]\nnetns = "none"\n[engine]\ncgroup_manager = "cgroupfs"\n'
        f'events_logger = "file"\nruntime = "{_runtime()}"\n',
    )
    user.write(
        ".config/containers/registries.conf",
        f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n',
    )


def _caller(user: RootlessUser) -> Callable[..., str]:
    def call(*argv: str) -> str:
        result = user.run(*argv)
        assert result.returncode == 0, f"{' '.join(argv[:2])} failed: {result.stderr.strip()}"
        return result.stdout

    return call


@pytest.fixture
def user(scratch: str) -> Iterator[RootlessUser]:
    _require("podman", "newuidmap", "fuse-overlayfs")
    with rootless_user(scratch) as made:
        yield made


def podman_scenario(
    user: RootlessUser, program: str, registry: Registry, image: str
) -> dict[str, Any]:
    """Pull, run as the image's root and chown, run with --userns=keep-id,
    commit and run the commit, remove everything; returns what was seen."""
    storage = f"{user.home}/{os.path.basename(program)}"
    _containers_conf(user, storage, program, registry)
    call = _caller(user)
    seen: dict[str, Any] = {}
    call("podman", "pull", "--quiet", image)
    writer = (
        "grep ' / ' /proc/mounts | cut -d' ' -f3; "
        "echo a > /tmp/a && chown app:app /tmp/a && mkdir /tmp/d && echo b > /tmp/d/b && "
        "chown -R daemon:daemon /tmp/d && chown root:app /home/app/owned && rm /etc/new && "
        f"mv /etc/passwd /etc/passwd.moved && {SHOW_OWNERS} /tmp/* /tmp/d/* /home/app/*"
    )
    out = call("podman", "run", "--name", "writer", image, "sh", "-c", writer).splitlines()
    seen["fstype"], seen["writer"] = out[0], out[1:]
    kept = f"id -u; id -g; echo mine > /tmp/mine; {SHOW_OWNERS} /tmp/mine /home/app/owned"
    seen["kept"] = call("podman", "run", "--name", "kept", "--userns=keep-id", image,
                        "sh", "-c", kept).splitlines()  # fmt: skip
    for name in ("writer", "kept"):
        upper = call("podman", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name)
        seen[f"upper-{name}"] = host_tree(upper.strip())
    call("podman", "commit", "--quiet", "writer", "localhost/committed:v1")
    show = f"{SHOW_OWNERS} /tmp/* /tmp/d/* /home/app/*; ls /etc; cat /home/app/owned"
    seen["committed"] = call("podman", "run", "--rm", "localhost/committed:v1", "sh", "-c",
                             show).splitlines()  # fmt: skip
    call("podman", "rm", "writer", "kept")
    call("podman", "rmi", "localhost/committed:v1", image)
    seen["left"] = call("podman", "images", "--quiet") + call("podman", "ps", "-a", "--quiet")
    return seen


def test_rootless_podman_with_id_mappings(user: RootlessUser, scratch: str) -> None:
    strata_overlayfs = _installed_strata_overlayfs()
    # The installed command runs for an unprivileged user (not from the checkout).
    version = user.run("strata-overlayfs", "--version")
    assert version.returncode == 0 and version.stdout.startswith("strata-overlayfs"), version
    with run_registry(f"{scratch}/registry") as registry:
        image = f"{registry.host}/owners:latest"
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
            owners_image(scratch), f"docker://{image}")  # fmt: skip
        results = {
            name: podman_scenario(user, program or strata_overlayfs, registry, image)
            for name, program in PROGRAMS.items()
        }
    ours, theirs = results["strata-overlayfs"], results["fuse-overlayfs"]
    assert ours["fstype"] == "fuse.strata" and theirs["fstype"] == "fuse.fuse-overlayfs"
    # What the containers saw: names mapped to the image's users; keep-id runs
    # as the calling user, who owns what it writes.
    assert {"/tmp/a 1000 1000 644", "/tmp/d/b 1 1 644", "/home/app/owned 0 1000 640"} <= set(
        ours["writer"]
    )
    # The image's app user is still the owner under keep-id's mapping.
    assert ours["kept"] == [str(user.uid), str(user.gid), f"/tmp/mine {user.uid} {user.gid} 644",
                            "/home/app/owned 1000 1000 640"]  # fmt: skip
    assert set(ours["writer"]) <= set(ours["committed"])
    assert "passwd.moved" in ours["committed"] and "new" not in ours["committed"]
    assert ours["committed"][-1] == "app's"  # the data of a file only chowned
    assert ours["left"] == ""
    for key in ("writer", "kept", "committed", "left"):
        assert ours[key] == theirs[key], key
    # Entry for entry the same owners, modes and content. fuse-overlayfs marks
    # every directory it makes opaque (.wh..opq beside its own .wh..wh..opq);
    # strata marks only those that hide something below, so markers are left out.
    for key in ("upper-writer", "upper-kept"):
        assert without_opaque_markers(ours[key]) == without_opaque_markers(theirs[key]), key
    # The upper directories hold host ids of the user's subordinate range.
    uids = {entry[1] for entry in ours["upper-writer"].values()}
    assert uids and all(uid != 0 for uid in uids) and len(uids) >= 3


# buildah ----------------------------------------------------------------------------

CONTAINERFILE = """\
FROM {image}
COPY strata-probe.deb /tmp/
RUN grep ' / ' /proc/mounts | cut -d' ' -f3 > /built-on
RUN dpkg -i /tmp/strata-probe.deb && rm /tmp/strata-probe.deb
RUN useradd --uid 1234 --create-home app && echo data > /home/app/file && \
    chown app:app /home/app/file && chmod 640 /home/app/file
RUN mkdir -p /opt/tree/sub && echo y > /opt/tree/sub/y && chmod 4755 /opt/tree/sub/y && \
    ln /opt/tree/sub/y /opt/hard && rm -r /usr/share/man /etc/motd
RUN mv /opt/tree /opt/renamed && echo again >> /home/app/file && rm /opt/hard && \
    chown 1234:1234 /opt/renamed
"""
SHOW_BUILT = "cat /usr/share/strata-probe/hello; stat -c '%U %a' /home/app/file"
# The sandbox's limits, as the podman documentation spells them (root's podman
# would ask for more open files than this machine grants).
LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
# Files whose content holds the time they were written.
TIMESTAMPED = ("var/log/", "var/cache/ldconfig/", "var/cache/debconf/")


def image_tree(layout: str, top: str, program: str) -> Tree:
    """The built image as umoci unpacks it, timestamped content left out;
    checks that RUN steps ran on *program*'s mounts."""
    rootfs = f"{top}/rootfs"
    run("umoci", "raw", "unpack", "--image", f"{layout}:built", rootfs)
    with open(f"{rootfs}/built-on") as handle:
        assert handle.read() == f"fuse.{'strata' if program == 'strata-overlayfs' else program}\n"
    tree = host_tree(rootfs)
    del tree["built-on"]
    for rel, (mode, uid, gid, _) in list(tree.items()):
        if rel.startswith(TIMESTAMPED):
            tree[rel] = (mode, uid, gid, "")
    shutil.rmtree(rootfs)
    return tree


def check_built(tree: Tree) -> None:
    assert tree["usr/share/strata-probe/hello"][0] == "-rw-r--r--"
    assert tree["home/app/file"][:3] == ("-rw-r-----", 1234, 1234)
    assert tree["opt/renamed"][:3] == ("drwxr-xr-x", 1234, 1234)
    assert tree["opt/renamed/sub/y"][:3] == ("-rwsr-xr-x", 0, 0)
    assert "opt/tree" not in tree and "opt/hard" not in tree and "etc/motd" not in tree
    assert not any(rel.startswith("usr/share/man") for rel in tree)


@pytest.fixture(scope="module")
def debian_in_registry(
    debian_image: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Registry, str]]:
    layout, tag = debian_image
    with run_registry(str(tmp_path_factory.mktemp("debian-registry"))) as registry:
        image = f"{registry.host}/debian:{tag}"
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
            f"docker://{image}")  # fmt: skip
        yield registry, image


def _build_context(top: str, image: str) -> str:
    context = f"{top}/context"
    os.makedirs(context)
    shutil.copy(make_deb(top), f"{context}/strata-probe.deb")
    with open(f"{context}/Containerfile", "w") as handle:
        handle.write(CONTAINERFILE.format(image=image))
    subprocess.run(["chmod", "-R", "a+rX", top], check=True)
    return context


def test_buildah_rootful(scratch: str, debian_in_registry: tuple[Registry, str]) -> None:
    _require("buildah", "podman", "fuse-overlayfs", "umoci")
    _, image = debian_in_registry
    context = _build_context(scratch, image)
    trees: dict[str, Tree] = {}
    for name, program in PROGRAMS.items():
        program = program or _installed_strata_overlayfs()
        storage = ["--root", f"{scratch}/{name}/root", "--runroot", f"{scratch}/{name}/run",
                   "--storage-driver", "overlay",
                   "--storage-opt", f"overlay.mount_program={program}"]  # fmt: skip
        try:
            run("buildah", *storage, "bud", "--quiet", "--isolation", "chroot",
                "--tls-verify=false", "-t", "localhost/built:latest", context)  # fmt: skip
            said = run("podman", *storage, "--cgroup-manager=cgroupfs", "--events-backend=file",
                       "--runtime", _runtime(), "run", "--rm", "--network", "none", *LIMITS,
                       "localhost/built:latest", "sh", "-c", SHOW_BUILT)  # fmt: skip
            assert said == "installed\napp 640\n"
            run("buildah", *storage, "push", "--quiet", "localhost/built:latest",
                f"oci:{scratch}/{name}/out:built")  # fmt: skip
            trees[name] = image_tree(f"{scratch}/{name}/out", f"{scratch}/{name}", name)
        finally:
            subprocess.run(["podman", *storage, "rmi", "--all", "--force"], capture_output=True)
            subprocess.run(["buildah", *storage, "rm", "--all"], capture_output=True)
    check_built(trees["strata-overlayfs"])
    assert trees["strata-overlayfs"] == trees["fuse-overlayfs"]


def test_buildah_rootless(
    user: RootlessUser, scratch: str, debian_in_registry: tuple[Registry, str]
) -> None:
    _require("buildah", "umoci")
    registry, image = debian_in_registry
    context = _build_context(f"{scratch}/build", image)
    call = _caller(user)
    trees: dict[str, Tree] = {}
    for name, program in PROGRAMS.items():
        storage = f"{user.home}/{name}"
        _containers_conf(user, storage, program or _installed_strata_overlayfs(), registry)
        call("buildah", "bud", "--quiet", "--isolation", "chroot", "-t",
             "localhost/built:latest", context)  # fmt: skip
        said = call("podman", "run", "--rm", "localhost/built:latest", "sh", "-c",
                    f"grep ' / ' /proc/mounts | cut -d' ' -f3; {SHOW_BUILT}")  # fmt: skip
        fstype = "fuse.strata" if name == "strata-overlayfs" else f"fuse.{name}"
        assert said.splitlines() == [fstype, "installed", "app 640"]
        call("buildah", "push", "--quiet", "localhost/built:latest", f"oci:{storage}/out:built")
        trees[name] = image_tree(f"{storage}/out", storage, name)
        call("podman", "rmi", "--all", "--force")
    check_built(trees["strata-overlayfs"])
    assert trees["strata-overlayfs"] == trees["fuse-overlayfs"]
