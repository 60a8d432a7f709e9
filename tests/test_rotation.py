"""An UPPER stacked as a lower layer, round after round, against overlayfs.

Each round mounts the stack with a fresh UPPER, renames populated lower
directories and directories made in the round before, renames every name of
hardlinked files, renames something back to the name it had, makes new files,
links and metadata-only copies; then the UPPER moves to the top of the lower
layers. The kernel's overlayfs (redirect_dir, index, metacopy) does the same
over its own copy of the stack; every result and every tree must match.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import replace

from tests.mounts import overlay_mount, strata_mount
from tests.ops import Op, apply, tree_paths
from tests.stackgen import generate, render
from tests.trees import Snapshot, differences, snapshot

DEFAULT_SEEDS = 10
ROUNDS = 4
STEPS = 40
KERNEL_OPTIONS = "redirect_dir=on,index=on,metacopy=on"


def _fresh(rng: random.Random, dirs: list[str], taken: set[str]) -> str:
    while True:
        parent = rng.choice(["", *dirs])
        name = f"r{rng.randrange(10_000)}"
        path = f"{parent}/{name}" if parent else name
        if path not in taken:
            return path


def _plan(rng: random.Random, mount: str, renamed: list[tuple[str, str]]) -> list[Op]:
    """This round's operations, chosen on the oracle's tree as it is now."""
    paths, dirs = tree_paths(mount)
    taken = set(paths)
    ops: list[Op] = []
    for old, new in renamed:  # a rename back to the name it had
        if new in taken and old not in taken:
            ops.append(Op("rename", new, old))
            taken.add(old)
    populated = [d for d in dirs if any(p.startswith(d + "/") for p in paths)]
    for source in rng.sample(populated, min(3, len(populated))):
        outside = [d for d in dirs if d != source and not d.startswith(source + "/")]
        target = _fresh(rng, outside, taken)
        ops.append(Op("rename", source, target))
        taken.add(target)
    files = [p for p in paths if os.path.isfile(os.path.join(mount, p))]
    linked = [p for p in files if os.lstat(os.path.join(mount, p)).st_nlink > 1]
    for path in linked:  # every name of every hardlinked file moves
        ops.append(Op("rename", path, _fresh(rng, [], taken)))
    for _ in range(STEPS):
        kind = rng.choice(["mkdir", "create", "link", "chmod", "rename", "append", "unlink"])
        target = _fresh(rng, dirs, taken)
        if kind == "mkdir":
            ops.append(Op("mkdir", target, number=0o755))
            ops.append(Op("create", f"{target}/inside", number=0o644, data=b"made in a round"))
        elif kind == "create":
            ops.append(Op("create", target, number=0o644, data=rng.randbytes(100)))
        elif files:
            path = rng.choice(files)
            if kind == "link":
                ops.append(Op("link", path, target))
            elif kind == "chmod":  # a metadata-only copy-up
                ops.append(Op("chmod", path, number=rng.choice([0o600, 0o640, 0o755])))
            elif kind == "rename":
                ops.append(Op("rename", path, target))
            elif kind == "append":
                ops.append(Op("append", path, data=b"appended"))
            else:
                ops.append(Op("unlink", path))
        taken.add(target)
    return ops


def _linked_loosely(tree: Snapshot) -> Snapshot:
    """The tree with the link counts and groups of hardlinked files left out.

    A layer that was an UPPER holds a second link of each copied-up hardlinked
    file outside it (overlayfs's WORK/index, strata's WORK/strata-links), which
    its st_nlink still counts; overlayfs also splits such files into one inode
    per name where strata keeps one. Content and attributes are still compared.
    """
    nodes = {
        path: replace(node, nlink=0) if node.kind != "d" and node.nlink > 1 else node
        for path, node in tree.nodes.items()
    }
    return replace(tree, nodes=nodes, hardlink_groups=set())


def _compare(oracle: str, mine: str, since: int) -> list[str]:
    window = (since - 2_000_000_000, time.time_ns() + 2_000_000_000)
    expected, actual = _linked_loosely(snapshot(oracle)), _linked_loosely(snapshot(mine))
    return differences(expected, actual, changed_between=window)


def test_uppers_rotated_into_the_lower_stack_match_overlayfs(scratch: str, seed: int) -> None:
    stack = generate(seed)
    theirs = render(stack, os.path.join(scratch, "k-layers"), for_kernel=True)
    ours = render(stack, os.path.join(scratch, "s-layers"), for_kernel=True)
    store = os.path.join(scratch, "store")
    rng = random.Random(seed)
    renamed: list[tuple[str, str]] = []
    since = time.time_ns()
    for round_number in range(ROUNDS):
        k_upper, s_upper = (os.path.join(scratch, f"{who}-upper{round_number}") for who in "ks")
        os.makedirs(k_upper)
        os.makedirs(s_upper)
        k_work, s_work = (os.path.join(scratch, f"{who}-work{round_number}") for who in "ks")
        with (
            overlay_mount(
                theirs,
                os.path.join(scratch, "overlay"),
                options=KERNEL_OPTIONS,
                upper=k_upper,
                work=k_work,
            ) as oracle,
            strata_mount(
                store, ours, os.path.join(scratch, "strata"), "--upper", s_upper, "--work", s_work
            ) as mine,
        ):
            found = _compare(oracle, mine, since)
            assert found == [], f"seed {seed}: the stack of round {round_number} differs"
            log: list[str] = []
            plan = _plan(rng, oracle, renamed)
            renamed = []
            for op in plan:
                want = apply(oracle, op)
                if want == ("errno", "EXDEV"):
                    continue  # overlayfs cannot do this rename; strata can (README)
                got = apply(mine, op)
                log.append(f"{op} -> {want}")
                assert got == want, (
                    f"seed {seed} round {round_number}: {op}\n oracle {want}\n ours   {got}\n"
                    + "\n".join(log[-10:])
                )
                if op.kind == "rename" and isinstance(want, list):
                    renamed.append((op.path, op.other))
            found = _compare(oracle, mine, since)
            assert found == [], f"seed {seed} round {round_number}:\n" + "\n".join(log[-10:])
        theirs.append(k_upper)
        ours.append(s_upper)
