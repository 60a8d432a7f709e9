from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.images import build_debian
from tests.mounts import force_unmount
from unionfs.mount import find_mount


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--seeds", type=int, default=0, help="run the differential tests on this many seeds"
    )
    parser.addoption(
        "--runslow", action="store_true", help="the long variants (more trials, larger trees)"
    )


@pytest.fixture
def runslow(request: pytest.FixtureRequest) -> bool:
    """Whether the long variants run (--runslow)."""
    return bool(request.config.getoption("--runslow"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module with DEFAULT_SEEDS runs its `seed` tests on that many seeds (or --seeds)."""
    default = getattr(metafunc.module, "DEFAULT_SEEDS", None)
    if default is not None and "seed" in metafunc.fixturenames:
        count = metafunc.config.getoption("--seeds") or default
        metafunc.parametrize("seed", range(count))


def _mounts_under(top: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as table:
        for line in table:
            point = line.split()[4]
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return found


@pytest.fixture
def scratch() -> Iterator[str]:
    """A fresh directory for one test; mounts left inside are removed first."""
    top = tempfile.mkdtemp(prefix="strata-test-")
    try:
        yield top
    finally:
        for point in sorted(_mounts_under(top), key=len, reverse=True):
            if find_mount(point) is not None:
                force_unmount(point)
        if _mounts_under(top):
            raise RuntimeError(f"mounts left under {top}; not removing it")
        shutil.rmtree(top)


@pytest.fixture(scope="session")
def debian_image() -> Iterator[tuple[str, str]]:
    """The Debian image (debootstrap, packed by umoci) built once per run and
    shared read-only by every test that needs it; returns (layout, tag)."""
    top = tempfile.mkdtemp(prefix="strata-debian-")
    try:
        yield build_debian(f"{top}/debian")
    finally:
        shutil.rmtree(top, ignore_errors=True)
