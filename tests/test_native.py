"""The request path compiled with mypyc (unionfs.native): used where setup
built it from the sources at hand, and never once a source has changed."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

from tests.layers import write
from tests.mounts import daemon_logs, strata_mount
from unionfs import native
from unionfs.mount import pid_file

_IMPORT_ALL = "import importlib; from unionfs import native\n" + "\n".join(
    f"importlib.import_module({name!r})" for name in native.NAMES
)
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(native.__file__)))


def _require_build() -> None:
    """A fresh build, as setup leaves it: missing is a setup failure (it logs
    why to .venv/strata-native.log); stale is a checkout edited since."""
    if not os.path.isdir(native.DIRECTORY):
        pytest.fail(f"setup compiled nothing into {native.DIRECTORY}")
    if not native.is_fresh(native.DIRECTORY):
        pytest.skip("the compiled modules' sources changed since setup built them")


def test_a_build_serves_only_the_sources_it_was_built_from(scratch: str) -> None:
    root, build = os.path.join(scratch, "source"), os.path.join(scratch, "build")
    for module in native.MODULES:
        os.makedirs(os.path.dirname(os.path.join(root, module)), exist_ok=True)
        shutil.copyfile(os.path.join(_CHECKOUT, module), os.path.join(root, module))
    os.makedirs(build)
    assert not native.is_fresh(build, root)  # no stamp: nothing was built
    with open(os.path.join(build, native.STAMP), "w") as stamp:
        stamp.write(native.sources_digest(root) + "\n")
    assert native.is_fresh(build, root)
    edited = os.path.join(root, native.MODULES[-1])
    with open(edited, "rb") as source:
        original = source.read()
    with open(edited, "ab") as source:
        source.write(b"\n")  # even a blank line: the build no longer matches
    assert not native.is_fresh(build, root)
    with open(edited, "wb") as source:
        source.write(original)
    assert native.is_fresh(build, root)
    os.unlink(edited)
    assert not native.is_fresh(build, root)


def test_every_listed_module_imports_compiled_unless_turned_off() -> None:
    _require_build()
    report = _IMPORT_ALL + "\nprint(','.join(native.compiled()))"
    compiled = subprocess.run(
        [sys.executable, "-c", report], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert compiled.split(",") == list(native.NAMES)
    python = subprocess.run(
        [sys.executable, "-c", report],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "STRATA_NATIVE": "0"},
    ).stdout.strip()
    assert python == ""


def test_the_mount_daemon_serves_requests_with_the_compiled_modules(scratch: str) -> None:
    _require_build()
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/d/f", b"data")
    mountpoint, store = os.path.join(scratch, "mnt"), os.path.join(scratch, "store")
    with strata_mount(store, [lower], mountpoint):
        with open(f"{mountpoint}/d/f", "rb") as mounted:
            assert mounted.read() == b"data"
        with open(pid_file(mountpoint)) as handle:
            pid = int(handle.read())
        with open(f"/proc/{pid}/maps") as handle:
            mapped = {line.split()[-1] for line in handle if line.count("/")}
    group = [path for path in mapped if os.path.basename(path).startswith(native.GROUP)]
    assert group and all(path.startswith(native.DIRECTORY + "/") for path in group)
    adapter = os.path.join(native.DIRECTORY, "unionfs", "fuse.")
    assert any(path.startswith(adapter) for path in mapped)
    assert f"request path: compiled with mypyc ({native.DIRECTORY})" in daemon_logs(store)


def _compiled_trees() -> list[tuple[str, ast.Module]]:
    trees = []
    for module in native.MODULES:
        with open(os.path.join(_CHECKOUT, module)) as source:
            trees.append((module, ast.parse(source.read())))
    return trees


def test_no_compiled_function_names_two_exception_types_alike() -> None:
    """mypyc gives a variable one type: `except FsError as exc` then `except
    OSError as exc` in one function makes the second a TypeError, raised
    inside the handler's error path (it once took the mount daemon down)."""
    found = []
    for module, tree in _compiled_trees():
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            types: dict[str, set[str]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.ExceptHandler) and node.name is not None:
                    caught = ast.unparse(node.type) if node.type is not None else "BaseException"
                    types.setdefault(node.name, set()).add(caught)
            found += [
                f"{module}:{function.lineno} {function.name}: {name} as {sorted(caught)}"
                for name, caught in types.items()
                if len(caught) > 1
            ]
    assert found == []


def test_no_compiled_generator_suspends_inside_an_except_clause() -> None:
    """A mypyc generator or coroutine keeps no exception state of its own:
    suspended in an except clause (yield, await) and resumed by a throw (a
    context manager's exit), it raised an exception without a value, and the
    daemon died in CPython's C code (a getxattr of an unlinked open file)."""
    found = [
        f"{module}:{node.lineno}: {type(node).__name__} in the except clause at {handler.lineno}"
        for module, tree in _compiled_trees()
        for handler in ast.walk(tree)
        if isinstance(handler, ast.ExceptHandler)
        for node in ast.walk(handler)
        if isinstance(node, ast.Yield | ast.YieldFrom | ast.Await)
    ]
    assert found == []
