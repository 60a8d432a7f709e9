"""W9: real work in a container rootfs.

A Debian rootfs (debootstrap, the machine's own apt mirror) is the image: one
lower layer, and the same tree split into four layers. Each driver mounts it
with an empty container layer and runs, in a chroot of the mount with /dev and
/proc bound, what a container does while it is built or used: `dpkg -i` of
local packages, a venv with `pip install` of local wheels, `configure && make`
of a C project, `git add/commit` of a tree of thousands of files, a cold
interpreter start, and `find`/`du` afterwards.

Besides each step's time it records what the step cost the daemon (its CPU)
and the FUSE requests the kernel sent to the mount, by opcode: the kernel's
`fuse_request_send` tracepoint counted by a histogram in a private tracing
instance, filtered to the mount's connection, so every FUSE driver is counted
the same way.

The rootfs and the inputs (.deb files from `apt-get download`, wheels from
`pip download`, a source tarball) are fetched once and kept in
$STRATA_BENCH_CACHE (default /var/cache/strata-bench): no network in the
timed part.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from drivers import Mounted, drop_caches, mounted

from tests.tracing import EventCounter

Metrics = dict[str, float]
DRIVERS = ("strata", "strata-no-passthrough", "strata-python", "overlay", "fuse-overlayfs",
           "native")  # fmt: skip
FUSE_DRIVERS = ("strata", "strata-no-passthrough", "strata-python", "fuse-overlayfs")
SUITE = "bookworm"
FULL_PACKAGES = ("gcc", "make", "libc6-dev", "python3", "python3-venv", "git")
DEBS_FULL = ("vim-runtime", "python3-pygments", "python3-pkg-resources")
DEBS_QUICK = ("less",)
WHEELS = ("rich", "requests")
HELLO = "pool/main/h/hello/hello_2.10.orig.tar.gz"
HELLO_SHA256 = "31e066137a962676e89f69d1b65382de95a7ef7d914b8cb956f41ea72e0f516b"
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


def cache_root() -> str:
    return os.environ.get("STRATA_BENCH_CACHE", "/var/cache/strata-bench")


def mirror() -> str:
    """The machine's own Debian mirror, from its apt sources."""
    sources = ["/etc/apt/sources.list"]
    with contextlib.suppress(FileNotFoundError):
        sources += sorted(
            os.path.join("/etc/apt/sources.list.d", name)
            for name in os.listdir("/etc/apt/sources.list.d")
        )
    for source in sources:
        try:
            with open(source) as handle:
                text = handle.read()
        except OSError:
            continue
        for match in re.finditer(r"^URIs:\s*(\S+)|^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
            uri = match.group(1) or match.group(2)
            if "security" not in uri:
                return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def _cached(name: str, fill: Callable[[str], None]) -> str:
    """A directory of the cache, filled once by *fill* in a temporary sibling
    and renamed into place whole, so an interrupted fill is never used."""
    target = os.path.join(cache_root(), name)
    if os.path.isdir(target):
        return target
    os.makedirs(cache_root(), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root())
    try:
        fill(partial)
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _run(command: list[str], **kwargs: object) -> None:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(command[:3])} failed: " + " | ".join(tail))


def rootfs(quick: bool) -> str:
    include = () if quick else FULL_PACKAGES
    url = mirror()

    def bootstrap(target: str) -> None:
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap is not installed (Debian package debootstrap)")
        args = ["debootstrap", "--variant=minbase"]
        if include:
            args.append("--include=" + ",".join(include))
        _run([*args, SUITE, os.path.join(target, "rootfs"), url])
        # What every image drops: apt's lists and downloaded archives.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in os.scandir(os.path.join(target, "rootfs", leftover)):
                if entry.is_file(follow_symlinks=False) and entry.name.endswith(".deb"):
                    os.unlink(entry.path)

    return os.path.join(_cached(f"rootfs-{_key(SUITE, url, include)}", bootstrap), "rootfs")


def split_layers(tree: str) -> list[str]:
    """*tree* as four layers, lowest first: the base without /usr's big
    parts, then /usr/share, /usr/lib and /usr/bin, each in a layer of its own."""
    parts = ("usr/share", "usr/lib", "usr/bin")

    def split(target: str) -> None:
        base = os.path.join(target, "0")
        os.makedirs(base)
        excludes = [f"--exclude=./{part}" for part in parts]
        _copy_tree(tree, ["."], base, excludes)
        for number, part in enumerate(parts, start=1):
            layer = os.path.join(target, str(number))
            os.makedirs(layer)
            _copy_tree(tree, [f"./{part}"], layer, [])

    top = _cached(f"split4-{_key(tree, os.stat(tree).st_mtime_ns)}", split)
    return [os.path.join(top, str(number)) for number in range(4)]


def _copy_tree(source: str, members: list[str], target: str, excludes: list[str]) -> None:
    """Copy *members* of *source* into *target* with owners, modes, links and xattrs."""
    packer = subprocess.Popen(
        ["tar", "-C", source, "--xattrs", "--numeric-owner", *excludes, "-cf", "-", *members],
        stdout=subprocess.PIPE,
    )
    _run(["tar", "-C", target, "--xattrs", "--numeric-owner", "-xpf", "-"], stdin=packer.stdout)
    assert packer.stdout is not None
    packer.stdout.close()
    if packer.wait() != 0:
        raise RuntimeError(f"tar of {source} failed")


def inputs(quick: bool) -> str:
    """What the steps install, fetched beforehand: debs/, wheels/, the tarball."""
    debs = DEBS_QUICK if quick else DEBS_FULL
    url = mirror()

    def fetch(target: str) -> None:
        os.makedirs(os.path.join(target, "debs"))
        download = ["apt-get", "download", "-qq", *debs]
        where = os.path.join(target, "debs")
        if subprocess.run(download, cwd=where, capture_output=True).returncode != 0:
            _run(["apt-get", "update", "-qq"])
            _run(download, cwd=where)
        if quick:
            return
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
              "--only-binary", ":all:", "--python-version", "3.11",
              "-d", os.path.join(target, "wheels"), *WHEELS])  # fmt: skip
        tarball = os.path.join(target, "hello-2.10.tar.gz")
        with urllib.request.urlopen(f"{url}/{HELLO}", timeout=120) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != HELLO_SHA256:
            raise RuntimeError(f"{url}/{HELLO}: unexpected digest")
        with open(tarball, "wb") as handle:
            handle.write(data)

    return _cached(f"inputs-{_key(debs, quick, url)}", fetch)


@dataclass(frozen=True)
class Step:
    name: str
    command: str
    cold: bool = False  # caches dropped first


def steps(quick: bool) -> list[Step]:
    if quick:
        return [
            Step("dpkg -i of less", "dpkg -i /srv/debs/*.deb >/dev/null"),
            Step("find / afterwards", "find / -xdev >/dev/null"),
            Step("du -s / afterwards", "du -sx / >/dev/null"),
        ]
    return [
        Step(
            "dpkg -i of vim-runtime, python3-pygments and python3-pkg-resources",
            "dpkg -i /srv/debs/*.deb >/dev/null",
        ),
        Step(
            "python3 -m venv and pip install of rich and requests",
            "python3 -m venv /root/venv && /root/venv/bin/pip install --quiet --no-index"
            " --find-links /srv/wheels rich requests",
        ),
        Step(
            "configure && make of GNU hello",
            "cd /root && tar -xzf /srv/hello-2.10.tar.gz && cd hello-2.10"
            " && ./configure --quiet >/dev/null && make --silent -j2 >/dev/null 2>&1",
        ),
        Step(
            "git init, add -A and commit of /usr/share/vim",
            "cd /usr/share/vim && git init --quiet && git add -A"
            " && git -c user.name=bench -c user.email=bench@localhost commit --quiet -m import",
        ),
        Step(
            "cold python3 start importing json, email, http.client, sqlite3, asyncio",
            "python3 -c 'import json, email, http.client, sqlite3, asyncio, decimal'",
            cold=True,
        ),
        Step("find / afterwards", "find / -xdev >/dev/null"),
        Step("du -s / afterwards", "du -sx / >/dev/null"),
    ]


def in_container(root: str, inputs_dir: str, command: str) -> None:
    """Run *command* chrooted into *root* with /dev, /proc and the inputs (at
    /srv) mounted in a private mount namespace: they go when it ends."""
    script = (
        'set -e; mount --rbind /dev "$1/dev"; mount -t proc proc "$1/proc";'
        ' mount --bind "$2" "$1/srv"; exec chroot "$1" /bin/sh -c "$3"'
    )
    _run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "w9",
         root, inputs_dir, command],
        env=ENV,
    )  # fmt: skip


@dataclass(frozen=True)
class Fixture:
    stacks: dict[str, list[str]]  # name -> layers, lowest first
    inputs: str
    steps: list[Step]


def build(top: str, quick: bool) -> Fixture:
    tree = rootfs(quick)
    stacks = {"1 layer": [tree]}
    if not quick:
        stacks["4 layers"] = split_layers(tree)
    return Fixture(stacks, inputs(quick), steps(quick))


def run(driver: str, fixture: Fixture, scratch: str, quick: bool) -> Metrics:
    out: Metrics = {}
    for stack, layers in fixture.stacks.items():
        where = os.path.join(scratch, stack.replace(" ", "-"))
        with mounted(driver, layers, os.path.join(where, "mnt"), where, writable=True) as mount:
            drop_caches()
            totals: dict[str, float] = {}
            for step in fixture.steps:
                if step.cold:
                    drop_caches()
                cost = measure(driver, mount, fixture.inputs, step.command)
                for what, value in cost.items():
                    out[f"[{stack}] {step.name}{what}"] = value
                    if not what.startswith(": requests, ") and "per request" not in what:
                        totals[what] = totals.get(what, 0.0) + value
            for what, value in totals.items():
                out[f"[{stack}] all steps{what}"] = value
            if totals.get(": requests"):
                cpu = totals[": daemon CPU (s)"]
                out[f"[{stack}] all steps: daemon CPU per request (µs)"] = (
                    cpu / totals[": requests"] * 1e6
                )
    return out


def measure(driver: str, mount: Mounted, inputs_dir: str, command: str) -> Metrics:
    """One step's time, and for a FUSE daemon its CPU and requests by opcode."""
    fuse = driver in FUSE_DRIVERS
    with contextlib.ExitStack() as stack:
        counter = stack.enter_context(RequestCounter(mount.path)) if fuse else None
        cpu = mount.cpu_seconds() if fuse else 0.0
        started = time.perf_counter()
        in_container(mount.path, inputs_dir, command)
        out: Metrics = {" (s)": time.perf_counter() - started}
        if not fuse:
            return out
        time.sleep(0.2)  # the releases the kernel sends after the last close
        out[": daemon CPU (s)"] = mount.cpu_seconds() - cpu
        by_opcode = counter.counts() if counter is not None else None
    if by_opcode is None:
        return out
    requests = sum(by_opcode.values())
    out[": requests"] = requests
    if requests:
        out[": daemon CPU per request (µs)"] = out[": daemon CPU (s)"] / requests * 1e6
    for opcode, count in sorted(by_opcode.items(), key=lambda item: -item[1]):
        if count:
            out[f": requests, {opcode}"] = count
    return out


class RequestCounter:
    """FUSE requests the kernel sends to one mount, by opcode.

    The `fuse/fuse_request_send` tracepoint, counted by tests/tracing.py's
    EventCounter and filtered to the mount's connection (a FUSE superblock's
    anonymous device: major 0, so the connection is its minor), so other
    mounts are not counted. `available` is False where the kernel lacks the
    tracepoint (or tracefs); counts() is None then, or after an overrun.
    """

    BUFFER_KIB = 65536  # per CPU: about a million requests between two counts

    def __init__(self, mountpoint: str) -> None:
        connection = os.minor(os.stat(mountpoint).st_dev)
        self._counter = EventCounter(
            {"fuse/fuse_request_send": f"connection == {connection}"},
            _opcodes,
            buffer_kib=self.BUFFER_KIB,
            name="strata-w9",
        )
        self.available = False

    def __enter__(self) -> RequestCounter:
        try:
            self._counter.__enter__()
            self.available = True
        except OSError as error:
            print(f"strata bench: FUSE requests not counted: {error}", file=sys.stderr)
        return self

    def counts(self) -> dict[str, int] | None:
        """Requests so far by opcode; None if the buffer overran (or none)."""
        return self._counter.counts() if self.available else None

    def __exit__(self, *exc: object) -> None:
        self._counter.__exit__(*exc)


def _opcodes(text: bytes) -> list[str]:
    return [name.decode() for name in re.findall(rb"opcode \d+ \(FUSE_(\w+)\)", text)]
