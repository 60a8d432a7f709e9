"""The `strata` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import StrataError, error_line, os_error_text
from .images_cli import _registry_arguments, add_image_verbs, mount_image, run_image_verb
from .mount import RUNTIME_DIR_HELP, default_root


def _is_mount_helper_call(arguments: list[str], parser: argparse.ArgumentParser) -> bool:
    """mount.fuse3 runs `strata SOURCE MOUNTPOINT -o OPTIONS` for `-t fuse.strata`."""
    verbs = next(
        action.choices
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return (
        len(arguments) >= 2
        and not arguments[0].startswith("-")
        and arguments[0] not in verbs
        and any(item.startswith("-o") for item in arguments[1:])
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata", description="A union filesystem for layered container images."
    )
    parser.add_argument("--version", action="version", version=f"strata {__version__}")
    parser.add_argument(
        "--root",
        default=None,
        help="store and index directory (default: $STRATA_ROOT or /var/lib/strata)",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    mount = verbs.add_parser(
        "mount",
        help="mount an image of the store (IMAGE MOUNTPOINT) or layer directories (--layer)",
        usage="strata mount IMAGE MOUNTPOINT [--name CONTAINER] | --layer DIR ... MOUNTPOINT",
        epilog=RUNTIME_DIR_HELP,
    )
    mount.add_argument(
        "--layer",
        action="append",
        metavar="DIR",
        help="a layer directory; repeat, lowest layer first",
    )
    mount.add_argument(
        "--name", metavar="CONTAINER", help="the container whose writable layer to use or make"
    )
    mount.add_argument(
        "--read-only", action="store_true", help="mount an image without a container layer"
    )
    mount.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="HOSTDIR:/PATH[:ro]",
        help="bind a host directory at PATH inside the mount (bypasses the container layer)",
    )
    mount.add_argument(
        "--upper", metavar="DIR", help="writable layer (overlayfs upper format); changes land here"
    )
    mount.add_argument(
        "--work", metavar="DIR", help="work directory on UPPER's filesystem (default: beside it)"
    )
    mount.add_argument(
        "--xattrs",
        choices=("auto", "trusted", "user"),
        default="auto",
        help="marker xattrs in UPPER: trusted.overlay.* or user.overlay.* (rootless)",
    )
    mount.add_argument(
        "--whiteouts",
        choices=("auto", "device", "file"),
        default="auto",
        help="whiteouts in UPPER: 0/0 character devices or .wh. files (rootless)",
    )
    for flag, what in (
        ("nodev", "device nodes cannot be opened"),
        ("nosuid", "set-user-ID, set-group-ID bits and file capabilities give nothing"),
        ("noexec", "nothing on the mount can be executed"),
    ):
        mount.add_argument(f"--{flag}", action="store_true", help=f"mount {flag}: {what}")
    mount.add_argument(
        "--atime",
        choices=("noatime", "relatime", "strictatime"),
        default="noatime",
        help="when a file of the container layer gets a new atime as it is opened for reading"
        " or listed: never (default), as relatime or as strictatime; lower layers' files keep"
        " theirs",
    )
    mount.add_argument(
        "--nodiratime",
        action="store_true",
        help="with --atime: listing a directory changes no atime",
    )
    mount.add_argument(
        "--lazy",
        action="store_true",
        help="IMAGE is a registry reference: mount once the layers' tables of contents are"
        " here (eStargz), fetch file data on demand and the rest in the background",
    )
    mount.add_argument(
        "--lazy-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a read waits for data from an unreachable registry before EIO",
    )
    mount.add_argument(
        "--record-reads",
        metavar="FILE",
        help="write the image files opened, first opened first, to FILE at unmount"
        " (a prefetch list for `strata convert --estargz --prefetch`)",
    )
    mount.add_argument(
        "--no-background-fetch",
        action="store_true",
        help="lazy layers: fetch only what is read (a later pull or push completes them)",
    )
    mount.add_argument(
        "--passthrough",
        choices=("auto", "on", "off"),
        default="auto",
        help="FUSE passthrough: the kernel reads and writes files' host copies itself"
        " (Linux 6.9+, libfuse 3.17, real root); auto uses it where it can, on refuses to"
        " mount without it (default: auto)",
    )
    _registry_arguments(mount)
    mount.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    mount.add_argument("targets", nargs="+", metavar="[IMAGE] MOUNTPOINT")

    fsck = verbs.add_parser("fsck", help="check a writable layer (not mounted) against its layers")
    fsck.add_argument("--layer", action="append", required=True, metavar="DIR")
    fsck.add_argument("--upper", required=True, metavar="DIR")
    fsck.add_argument("--work", metavar="DIR")
    fsck.add_argument("--repair", action="store_true", help="remove what a crash left behind")

    umount = verbs.add_parser("umount", help="unmount a strata mount")
    umount.add_argument("mountpoint")

    verbs.add_parser("demo", help="mount the built-in sample image, list it, unmount")
    snapshotter = verbs.add_parser(
        "snapshotter",
        help="serve containerd's snapshots API on a unix socket (a proxy plugin)",
        description="Serve containerd's snapshots API: committed chains as strata views, "
        "containers' layers as overlay mounts over them. Snapshots live under "
        "ROOT/snapshotter. Stops on SIGTERM or SIGINT.",
    )
    snapshotter.add_argument(
        "--address", required=True, metavar="SOCKET", help="the unix socket to serve on"
    )
    snapshotter.add_argument(
        "--root",
        dest="snapshotter_root",
        metavar="DIR",
        help="where snapshots live (default: ROOT/snapshotter)",
    )
    snapshotter.add_argument(
        "--passthrough",
        choices=("auto", "on", "off"),
        default="auto",
        help="FUSE passthrough for the views (as for strata mount)",
    )
    snapshotter.add_argument(
        "--view-idle",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long an image's view stays mounted with no container on it "
        "(default 60; 0 unmounts it at once)",
    )
    snapshotter.add_argument(
        "--writable",
        choices=("overlay", "fuse"),
        default="overlay",
        help="containers' layers: overlayfs over the image's view (default), or "
        "strata's own writable mounts where overlayfs cannot be used",
    )
    _registry_arguments(snapshotter)
    verbs.add_parser(
        "bench",
        help="benchmark strata beside its peers (strata bench --help)",
        add_help=False,
        prefix_chars="\0",  # every argument goes to the suite's own parser
    ).add_argument("suite_args", nargs=argparse.REMAINDER)
    add_image_verbs(verbs)
    return parser


def run_bench(arguments: list[str]) -> int:
    """`strata bench`: the suite in the checkout's benchmarks/ directory."""
    suite = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "benchmarks", "suite.py")  # fmt: skip
    if not os.path.exists(suite):
        print(error_line("strata", f"bench runs from a source checkout: {suite} is missing"),
              file=sys.stderr)  # fmt: skip
        return 1
    sys.path.insert(0, os.path.dirname(suite))
    import suite as bench_suite

    return int(bench_suite.main(arguments))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if _is_mount_helper_call(arguments, parser):
        from .overlayfs_cli import run

        return run(arguments)
    if arguments[:1] == ["bench"]:
        return run_bench(arguments[1:])
    args, extra = parser.parse_known_args(arguments)
    # argparse stops filling a positional list at the first option, so
    # `mount IMAGE --name C MOUNTPOINT` leaves MOUNTPOINT over: take it back.
    if args.verb == "mount" and extra and not any(item.startswith("-") for item in extra):
        args.targets.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    root = os.path.abspath(args.root or default_root())
    try:
        if args.verb == "mount" and not args.layer:
            if len(args.targets) != 2:
                parser.error("mount takes IMAGE MOUNTPOINT, or --layer DIR ... MOUNTPOINT")
            if args.upper or args.work:
                raise StrataError(
                    "an image mount keeps its writable layer in the store: use --name"
                )
            mount_image(args, root)
        elif args.verb == "mount":
            from .mount import (
                MountRequest,
                WritableLayer,
                atime_of,
                default_work_dir,
                mount,
                restrictions_of,
            )

            if len(args.targets) != 1:
                parser.error("with --layer, mount takes only the MOUNTPOINT")
            if args.name or args.read_only:
                raise StrataError("--name and --read-only are for image mounts")
            if args.lazy:
                raise StrataError("--lazy mounts an image from a registry, not --layer directories")
            writable = None
            if args.upper:
                work = args.work or default_work_dir(args.upper)
                writable = WritableLayer(args.upper, work, args.xattrs, args.whiteouts)
            elif args.work:
                raise StrataError("--work needs --upper")
            from .volumes import parse_volume

            volumes = [parse_volume(text) for text in args.volume]
            mount(
                MountRequest(
                    root,
                    args.layer,
                    args.targets[0],
                    args.foreground,
                    writable,
                    volumes=volumes,
                    restrictions=restrictions_of(args),
                    record_reads=os.path.abspath(args.record_reads) if args.record_reads else None,
                    passthrough=args.passthrough,
                    atime=atime_of(args),
                )
            )
        elif args.verb == "fsck":
            from .mount import MountRequest, WritableLayer, check_upper, default_work_dir

            work = args.work or default_work_dir(args.upper)
            request = MountRequest(root, args.layer, "", writable=WritableLayer(args.upper, work))
            findings = check_upper(request, args.repair)
            for line in findings:
                print(line)
            unrepaired = [line for line in findings if not line.endswith("(repaired)")]
            print(f"strata fsck: {len(findings)} problems, {len(unrepaired)} left")
            return 1 if unrepaired else 0
        elif args.verb == "umount":
            from .mount import unmount

            unmount(args.mountpoint)
        elif args.verb == "snapshotter":
            from .images_cli import registry_options_for
            from .snapshot.server import serve

            where = args.snapshotter_root or os.path.join(root, "snapshotter")
            serve(
                args.address,
                os.path.abspath(where),
                args.passthrough,
                registry_options_for(args),
                args.view_idle,
                args.writable,
            )
        elif args.verb == "demo":
            from .sample import run_demo

            run_demo(root)
        else:
            return run_image_verb(args, root)
    except StrataError as exc:
        print(error_line("strata", exc), file=sys.stderr)
        return 1
    except OSError as exc:
        # A path the user gave that cannot be used (full disk, no permission,
        # a file where a directory should be): one line, as for any mistake.
        print(error_line("strata", os_error_text(exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
