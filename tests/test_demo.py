"""The README's main job: `strata demo` mounts the sample image, lists it, unmounts."""

from __future__ import annotations

import os

from tests.mounts import strata


def test_demo_lists_the_merged_sample_and_unmounts(scratch: str) -> None:
    root = os.path.join(scratch, "store")
    result = strata(root, "demo")
    lines = [line for line in result.stdout.splitlines() if line and line[0] in "-dlpcbs"]
    paths = {line.split()[5] for line in lines}
    listed = {line.rsplit(" ", 1)[-1] for line in result.stdout.splitlines()}
    assert "/etc/motd" in paths and "/opt/app/config.yaml" in paths
    assert "/opt/app/config.json" not in paths  # below an opaque directory
    assert "/opt/app/old.txt" not in paths  # OCI whiteout
    assert "/usr/share/doc/readme.txt" not in paths  # overlayfs whiteout
    assert not any(".wh." in name for name in listed)
    assert 'VERSION="2"' in result.stdout
    with open("/proc/self/mountinfo") as table:
        assert "strata-demo-" not in table.read()
