"""strata's request path compiled to C with mypyc, where setup built it.

Every FUSE request runs the adapter, the view and the node table in
Python; compiled by mypyc (the same typed source, checked by mypy) the same
work costs about half the interpreter's CPU. Setup compiles MODULES into
DIRECTORY with a digest of their sources, and a package imports its
compiled modules from there only while every one of those sources is
unchanged: an edited checkout runs its own Python, never a stale build.
STRATA_NATIVE=0 runs the Python anyway.

Two rules keep the compiled code as correct as the Python (tests check
both): a function never catches two exception types under one name (mypyc
gives a variable one type), and no generator or coroutine yields or awaits
inside an except clause (mypyc's keep no exception state of their own, and
one resumed there by a throw raised an exception without a value).

Left out, each for a reason: core/syscalls.py, which holds the ctypes
structures the request path's system calls need (mypyc cannot compile a
ctypes structure), and the modules whose tests count work by patching a
method (index, openahead).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys

# Paths relative to the directory that holds the unionfs package.
MODULES = (
    "unionfs/errors.py",
    "unionfs/threads.py",
    "unionfs/passthrough.py",
    "unionfs/fuse.py",
    "unionfs/kernel_sync.py",
    "unionfs/core/acl.py",
    "unionfs/core/atime.py",
    "unionfs/core/chunks.py",
    "unionfs/core/claim.py",
    "unionfs/core/copyup.py",
    "unionfs/core/data.py",
    "unionfs/core/fileflags.py",
    "unionfs/core/layer.py",
    "unionfs/core/merge.py",
    "unionfs/core/nodes.py",
    "unionfs/core/overrides.py",
    "unionfs/core/paths.py",
    "unionfs/core/reading.py",
    "unionfs/core/records.py",
    "unionfs/core/stack.py",
    "unionfs/core/streaming.py",
    "unionfs/core/upper.py",
    "unionfs/core/view.py",
)
# The same as module names.
NAMES = tuple(module.removesuffix(".py").replace("/", ".") for module in MODULES)
# The library all compiled modules share (mypyc's runtime and their code).
GROUP = "strata_native"
DIRECTORY = os.path.join(sys.prefix, "strata-native")
STAMP = "sources.sha256"

_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sources_digest(root: str) -> str:
    """The digest of MODULES as found under *root*; a missing one counts."""
    digest = hashlib.sha256()
    for module in MODULES:
        digest.update(module.encode() + b"\0")
        try:
            with open(os.path.join(root, module), "rb") as source:
                digest.update(hashlib.sha256(source.read()).digest())
        except FileNotFoundError:
            digest.update(b"missing")
    return digest.hexdigest()


def is_fresh(directory: str, root: str = _SOURCE_ROOT) -> bool:
    """Whether *directory* holds a build of exactly the sources under *root*."""
    try:
        with open(os.path.join(directory, STAMP)) as stamp:
            built = stamp.read().strip()
    except OSError:
        return False
    return built == sources_digest(root)


def _turned_off() -> bool:
    return os.environ.get("STRATA_NATIVE", "1") == "0"


@functools.cache
def _active_directory() -> str | None:
    """DIRECTORY if its build is fresh and wanted (then its shared library
    is loaded), else None; decided once per process."""
    if _turned_off() or not is_fresh(DIRECTORY):
        return None
    _load_group(DIRECTORY)
    return DIRECTORY


def _load_group(directory: str) -> None:
    """Load the shared library that each compiled module imports by name,
    so that DIRECTORY need not be on sys.path."""
    name = f"{GROUP}__mypyc"
    for entry in os.listdir(directory):
        if entry.startswith(name + ".") and entry.endswith(".so"):
            spec = importlib.util.spec_from_file_location(name, os.path.join(directory, entry))
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return


def describe() -> str:
    """How this process runs the request path, for the mount's log."""
    if _active_directory() is not None:
        return f"compiled with mypyc ({DIRECTORY})"
    if _turned_off():
        return "Python (STRATA_NATIVE=0)"
    if not os.path.isdir(DIRECTORY):
        return f"Python (nothing compiled in {DIRECTORY}: see tools/setup.sh)"
    return "Python (its sources changed since setup compiled them)"


def extend_path(path: list[str], package: str) -> list[str]:
    """A package's __path__ with its compiled modules first, when they are
    fresh: each package of MODULES calls this from its __init__."""
    directory = _active_directory()
    if directory is None:
        return path
    return [os.path.join(directory, *package.split(".")), *path]


def compiled() -> list[str]:
    """The modules of MODULES this process imported compiled."""
    return [
        name
        for name in NAMES
        if name in sys.modules
        and not (getattr(sys.modules[name], "__file__", None) or "").endswith(".py")
    ]


def build(directory: str) -> None:
    """Compile MODULES into *directory* (replacing what it held), then stamp it."""
    import shutil
    import tempfile

    from mypyc.build import mypycify
    from setuptools import setup

    with tempfile.TemporaryDirectory() as scratch:
        output = os.path.join(scratch, "out")
        here = os.getcwd()
        # mypyc names modules by their paths from the working directory, and
        # setuptools must not read the project's own pyproject.toml here.
        os.chdir(_SOURCE_ROOT)
        try:
            extensions = mypycify(
                list(MODULES), group_name=GROUP, target_dir=os.path.join(scratch, "c")
            )
            os.chdir(scratch)
            setup(
                name=GROUP,
                ext_modules=extensions,
                script_args=[
                    "--quiet",
                    "build_ext",
                    "--build-lib",
                    output,
                    "--build-temp",
                    os.path.join(scratch, "tmp"),
                ],
            )
        finally:
            os.chdir(here)
        with open(os.path.join(output, STAMP), "w") as stamp:
            stamp.write(sources_digest(_SOURCE_ROOT) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(output, directory)
