"""Strata against the kernel's overlayfs on random stacks: same tree, always."""

from __future__ import annotations

import os

from tests.mounts import overlay_mount, strata_mount
from tests.stackgen import generate, render
from tests.trees import differences, snapshot

DEFAULT_SEEDS = 30


def test_random_stack_matches_overlayfs(scratch: str, seed: int) -> None:
    stack = generate(seed)
    ours = render(stack, os.path.join(scratch, "strata-layers"), for_kernel=False)
    theirs = render(stack, os.path.join(scratch, "kernel-layers"), for_kernel=True)
    root = os.path.join(scratch, "store")
    with overlay_mount(theirs, os.path.join(scratch, "overlay")) as mounted:
        expected = snapshot(mounted)
    with strata_mount(root, ours, os.path.join(scratch, "strata")) as mounted:
        actual = snapshot(mounted)
    assert len(expected.nodes) > 1, "the generated stack should not be empty"
    assert differences(expected, actual) == []
