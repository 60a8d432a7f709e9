"""The image verbs of `strata`: pull, push, import, export, images, inspect,
rmi, ps, rm, prune, diff, commit, and mounting an image by name."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from .errors import StrataError

if TYPE_CHECKING:  # loaded by the verbs that use it: a mount daemon forks from here
    from .image.store import Image, Store


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    lowered = text.lower().rstrip("ib")
    try:
        if lowered and lowered[-1] in units:
            return int(float(lowered[:-1]) * units[lowered[-1]])
        return int(lowered)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 2G)") from None


def _registry_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-verify",
        type=_bool,
        default=True,
        metavar="BOOL",
        help="verify TLS; false also allows plain http (default true)",
    )
    parser.add_argument("--ca-cert", metavar="FILE", help="CA certificate(s) to trust (PEM)")
    parser.add_argument("--creds", metavar="USER[:PASS]", help="registry credentials")
    parser.add_argument(
        "--authfile", metavar="FILE", help="auth.json to read credentials from (as podman's)"
    )
    parser.add_argument("--jobs", type=int, default=4, help="blobs transferred at once")
    parser.add_argument("--retries", type=int, default=4, help="retries of a failed request")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_image_verbs(verbs: Any) -> None:
    pull = verbs.add_parser("pull", help="pull an image from a registry into the store")
    pull.add_argument("image", metavar="HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]")
    pull.add_argument("--platform", default="linux/amd64", help="OS/ARCH[/VARIANT] to choose")
    pull.add_argument("--max-layer-size", type=_size, help="refuse layers larger than this")
    pull.add_argument(
        "--lazy",
        action="store_true",
        help="eStargz layers: fetch only their tables of contents now, file data on demand",
    )
    _registry_arguments(pull)

    push = verbs.add_parser("push", help="push an image of the store to a registry")
    push.add_argument("image")
    push.add_argument("destination", metavar="HOST[:PORT]/REPOSITORY[:TAG]", nargs="?")
    push.add_argument(
        "--chunk-size", type=_size, default=0, help="upload blobs in chunks of this size"
    )
    _registry_arguments(push)

    imp = verbs.add_parser(
        "import", help="import oci:DIR[:TAG] or docker-archive:FILE.tar into the store"
    )
    imp.add_argument("source")
    imp.add_argument("name", nargs="?", metavar="NAME[:TAG]")
    imp.add_argument("--platform", default="linux/amd64")
    imp.add_argument("--max-layer-size", type=_size)

    exp = verbs.add_parser("export", help="export an image to oci:DIR[:TAG] or docker-archive:FILE")
    exp.add_argument("image")
    exp.add_argument("destination")

    images = verbs.add_parser("images", help="list the images of the store")
    images.add_argument("--json", action="store_true")

    inspect = verbs.add_parser("inspect", help="show an image's manifest and config")
    inspect.add_argument("image")

    rmi = verbs.add_parser("rmi", help="remove an image name (and what only it used)")
    rmi.add_argument("image", nargs="+")

    verbs.add_parser("ps", help="list containers")

    rm = verbs.add_parser("rm", help="remove a container and its writable layer")
    rm.add_argument("container", nargs="+")

    verbs.add_parser("prune", help="remove blobs, layers and leftovers nothing uses")

    diff = verbs.add_parser("diff", help="a container's changes as A/C/D lines")
    diff.add_argument("container", metavar="CONTAINER|MOUNTPOINT")

    commit = verbs.add_parser("commit", help="save a container's changes as a new image")
    commit.add_argument("container", metavar="CONTAINER|MOUNTPOINT")
    commit.add_argument("name", metavar="NAME[:TAG]")
    commit.add_argument(
        "--timestamp",
        help="creation time (seconds or RFC 3339); file times are clamped to it,"
        " so the same changes give the same digest",
    )
    commit.add_argument("-m", "--message", default="", help="history comment")

    convert = verbs.add_parser(
        "convert", help="rewrite an image's layers as eStargz, for lazy pulling"
    )
    convert.add_argument("image", metavar="IMAGE")
    convert.add_argument("name", metavar="NEWIMAGE")
    convert.add_argument(
        "--estargz",
        action="store_true",
        required=True,
        help="the format to write (the one there is): eStargz, readable as gzip by any tool",
    )
    convert.add_argument(
        "--prefetch",
        metavar="FILE",
        help="paths read first (one per line, as `strata mount --record-reads` writes"
        " them): put before the prefetch landmark",
    )
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def _registry_options(args: argparse.Namespace, host: str) -> Any:
    from .image.registry import RegistryOptions, load_credentials

    user, password = load_credentials(args.creds, args.authfile, host)
    options = RegistryOptions(
        tls_verify=args.tls_verify,
        ca_cert=args.ca_cert,
        username=user,
        password=password,
        retries=max(0, args.retries),
        jobs=max(1, args.jobs),
    )
    if args.quiet:
        options.progress = False
    if args.ca_cert and not os.path.isfile(args.ca_cert):
        raise StrataError(f"--ca-cert {args.ca_cert}: no such file")
    return options


def _lazy_of(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """A container's image layers whose data comes on demand, by directory."""
    from .lazy.layers import open_lazy_layers

    image = store.load_image(record["manifest"])
    return {layer.layer_dir: layer for layer in open_lazy_layers(store, image)}


def registry_options_for(args: argparse.Namespace) -> Callable[[str], Any]:
    """The registry options of *args* for any host (credentials differ by host):
    for a server that meets registries as requests name them."""
    if args.ca_cert and not os.path.isfile(args.ca_cert):
        raise StrataError(f"--ca-cert {args.ca_cert}: no such file")
    return lambda host: _registry_options(args, host)


def _report(quiet: bool) -> Callable[[str], None]:
    """What push did, on stderr (as skopeo tells which blobs it skipped) unless -q."""

    def report(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    return report


def _note(message: str) -> None:
    if sys.stderr.isatty():
        print(message, file=sys.stderr)


def _describe(names: list[str], image: Image) -> dict[str, Any]:
    return {
        "names": names,
        "id": image.id,
        "digest": image.digest,
        "created": image.config.get("created", ""),
        "size": image.size,
        "layers": len(image.layers),
        "platform": f"{image.config.get('os', '?')}/{image.config.get('architecture', '?')}",
    }


def find_container(store: Store, text: str) -> dict[str, Any]:
    """A container by name, or the one mounted at a path."""
    if "/" not in text and os.path.isdir(os.path.join(store.containers_dir, text)):
        return store.container(text)
    if os.path.isdir(text):
        from .mount import find_mount, is_strata_mount

        real = os.path.realpath(text)
        for record in store.containers():
            if record.get("mountpoint") == real and is_strata_mount(find_mount(real)):
                return record
        raise StrataError(f"no container of store {store.root} is mounted at {real}")
    raise StrataError(f"no container {text} in the store (see `strata ps`)")


def run_image_verb(args: argparse.Namespace, root: str) -> int:
    from .image.store import open_store

    verb = args.verb
    store = open_store(root, getattr(args, "max_layer_size", None))
    if verb == "pull":
        from .image.reference import parse_reference
        from .image.registry import pull

        reference = parse_reference(args.image, remote=True)
        options = _registry_options(args, reference.registry)
        options.platform = args.platform
        with store.shared():
            if args.lazy:
                from .lazy.layers import pull_lazy

                image = pull_lazy(store, reference, options, _note)
            else:
                from .lazy.layers import finish_from_store

                image = pull(store, reference, options, _note, partial(finish_from_store, store))
        print(image.digest)
    elif verb == "push":
        from .image.reference import parse_reference
        from .image.registry import push
        from .lazy.layers import complete_layers

        report = _report(args.quiet)
        with store.shared():
            name, image = store.resolve(args.image)
            complete_layers(store, image)  # a lazily pulled layer's blob first
            reference = parse_reference(args.destination or name, remote=True)
            digest = push(
                store, image, reference, _registry_options(args, reference.registry), report
            )
        print(digest)
    elif verb == "import":
        from .image.archive import import_docker_archive, import_oci, parse_location
        from .image.reference import parse_reference

        location = parse_location(args.source)
        names = [parse_reference(args.name).name] if args.name else []
        with store.shared():
            if location.transport == "oci":
                image = import_oci(store, location, names, args.platform, _note)
            else:
                image = import_docker_archive(store, location, names, _note)
        print(image.digest)
    elif verb == "export":
        from .image.archive import export_docker_archive, export_oci, parse_location
        from .lazy.layers import complete_layers

        location = parse_location(args.destination)
        with store.shared():
            name, image = store.resolve(args.image)
            complete_layers(store, image)  # a lazily pulled layer's blob first
            if location.transport == "oci":
                export_oci(store, image, location, name)
            else:
                export_docker_archive(store, image, location, name)
    elif verb == "images":
        from .lazy.layers import local_fraction

        listed = [
            {**_describe(names, image), "local": round(local_fraction(store, image), 4)}
            for names, image in store.images()
        ]
        if args.json:
            print(json.dumps(listed, indent=2))
        else:
            print(f"{'NAME':50} {'ID':12} {'CREATED':20} {'SIZE':>10} {'LOCAL':>6}")
            for item in listed:
                for name in item["names"]:
                    size = f"{item['size'] / 2**20:.1f} MiB"
                    local = f"{item['local'] * 100:.0f}%"
                    print(f"{name:50} {item['id'][7:19]:12} {item['created'][:19]:20} {size:>10}"
                          f" {local:>6}")  # fmt: skip
    elif verb == "inspect":
        name, image = store.resolve(args.image)
        names = [n for n, d in store.refs().items() if d == image.digest]
        print(
            json.dumps(
                {
                    **_describe(names, image),
                    "mediaType": image.media_type,
                    "manifest": image.manifest,
                    "config": image.config,
                },
                indent=2,
            )
        )
    elif verb == "rmi":
        with store.exclusive():
            for text in args.image:
                name, image = store.resolve(text)
                refs = store.refs()
                names = [n for n, d in refs.items() if d == image.digest]
                targets = names if name not in refs else [name]
                users = [r["name"] for r in store.containers() if r["manifest"] == image.digest]
                if users and len(targets) == len(names):
                    raise StrataError(
                        f"image {text} is used by container(s) {', '.join(users)}; `strata rm` them"
                    )
                for target in targets:
                    store.untag(target)
                    print(f"untagged {target}")
            blobs, layers, _ = store.prune(leftovers=False)
            if blobs or layers:
                print(f"deleted {blobs} blobs, {layers} layers")
    elif verb == "ps":
        from .mount import find_mount, is_strata_mount

        print(f"{'CONTAINER':30} {'IMAGE':40} {'MOUNTPOINT'}")
        for record in store.containers():
            point = record.get("mountpoint") or ""
            shown = point if point and is_strata_mount(find_mount(point)) else "-"
            print(f"{record['name']:30} {record['image']:40} {shown}")
    elif verb == "rm":
        with store.exclusive():
            for name in args.container:
                store.remove_container(name)
                print(name)
    elif verb == "prune":
        with store.exclusive():
            blobs, layers, leftovers = store.prune()
        print(f"deleted {blobs} blobs, {layers} layers, {leftovers} leftovers")
    elif verb == "diff":
        from .image.changes import container_view, diff_lines

        with store.shared():
            record = find_container(store, args.container)
            with container_view(store, record, _lazy_of(store, record)) as view:
                for line in diff_lines(view):
                    print(line)
    elif verb == "convert":
        from .image.reference import parse_reference
        from .lazy.convert import convert_to_estargz, read_prefetch_list

        prefetch = read_prefetch_list(args.prefetch) if args.prefetch else []
        name = parse_reference(args.name).name
        with store.shared():
            _, image = store.resolve(args.image)
            converted = convert_to_estargz(store, image, [name], prefetch, _report(args.quiet))
        print(converted.digest)
    elif verb == "commit":
        from .image.changes import commit, parse_timestamp
        from .image.reference import parse_reference

        timestamp = parse_timestamp(args.timestamp) if args.timestamp else None
        name = parse_reference(args.name).name
        with store.shared():
            record = find_container(store, args.container)
            result = commit(store, record, [name], timestamp=timestamp, message=args.message,
                            lazy=_lazy_of(store, record))  # fmt: skip
        print(result.image.digest)
    else:  # pragma: no cover - argparse knows the verbs
        raise StrataError(f"unknown verb {verb}")
    return 0


def _layer_stream(store: Store, image: Image, reference: Any, options: Any, timeout: float) -> Any:
    """The image's top layers not stored yet (pull_lazy left them): a mount
    streams them in while it serves. None if every layer is here."""
    from .image.registry import ProgressLine, RegistryClient
    from .lazy.streaming import LayerBusy, LayerStream, StreamedLayer

    missing = [
        StreamedLayer(blob, diff_id, store.stream_work_dir(diff_id), store.layer_path(diff_id))
        for blob, diff_id in zip(image.layers, image.diff_ids, strict=True)
        if not os.path.isdir(store.layer_path(diff_id))
    ]
    if not missing:
        return None
    client = RegistryClient(reference.registry, options)
    try:
        return LayerStream(store, client, reference.repository, missing, timeout)
    except LayerBusy as exc:
        # Another mount streams it (or a pull unpacks it): wait for it whole.
        _note(f"{exc}; waiting for it")
        progress = ProgressLine(False, "")
        for layer in missing:
            client.fetch_blob(store, reference.repository, layer.blob, progress)
            store.unpack(layer.blob, layer.diff_id)
        return None


def _layer_paths(store: Store, image: Image, stream: Any) -> list[str]:
    """The image's layer directories; those that stream in are made by then."""
    if stream is None:
        return store.unpack_all(image)
    return [store.layer_path(diff_id) for diff_id in image.diff_ids]


def mount_image(args: argparse.Namespace, root: str) -> None:
    """`strata mount IMAGE MOUNTPOINT [--name C]`: the image's layers under the
    container's writable layer, made on first use and kept until `strata rm`."""
    from .image.store import open_store
    from .mount import (
        MountRequest,
        WritableLayer,
        atime_of,
        check_mountpoint,
        mount,
        restrictions_of,
    )
    from .volumes import parse_volume

    image_text, mountpoint = args.targets
    restricted = restrictions_of(args)
    volumes = [parse_volume(text) for text in args.volume]
    store = open_store(root)
    check_mountpoint(mountpoint)
    options = None
    if args.lazy:
        from .image.reference import parse_reference
        from .lazy.layers import pull_lazy

        reference = parse_reference(image_text, remote=True)
        options = _registry_options(args, reference.registry)
        options.progress = False
        with store.shared():
            pull_lazy(store, reference, options, _note, stream=True)
        image_text = reference.name
    stream = None
    with store.shared():
        name, image = store.resolve(image_text)
        if args.lazy:
            stream = _layer_stream(store, image, reference, options, args.lazy_timeout)
        paths = _layer_paths(store, image, stream)
        known = [store.layer_known_id(diff_id) for diff_id in image.diff_ids]
        from .lazy.layers import open_lazy_layers

        lazy = open_lazy_layers(
            store, image, options, args.lazy_timeout, background=not args.no_background_fetch
        )
        record: dict[str, Any] | None = None
        created = False
        if not args.read_only:
            if args.name:
                try:
                    record = store.container(args.name)
                except StrataError:
                    record = None
                if record is not None and record["manifest"] != image.digest:
                    raise StrataError(
                        f"container {args.name} belongs to image {record['image']},"
                        f" not {image_text}"
                    )
            if record is None:
                record = store.create_container(args.name, name, image)
                created = True
        elif args.name:
            raise StrataError("--read-only mounts no container; leave out --name")
    request = MountRequest(
        root,
        paths,
        mountpoint,
        args.foreground,
        None,
        known,
        volumes=volumes,
        restrictions=restricted,
        lazy=lazy,
        record_reads=os.path.abspath(args.record_reads) if args.record_reads else None,
        stream=stream,
        passthrough=args.passthrough,
        atime=atime_of(args),
    )
    if record is None:
        mount(request)
        return
    directory = store.container_dir(record["name"])
    request = dataclasses.replace(
        request,
        writable=WritableLayer(
            os.path.join(directory, "upper"),
            os.path.join(directory, "work"),
            args.xattrs,
            args.whiteouts,
        ),
    )
    real = os.path.realpath(mountpoint)
    if created and not args.name:
        print(record["name"], flush=True)
    if args.foreground:
        store.update_container(record["name"], mountpoint=real)
        mount(request)
        return
    try:
        mount(request)
    except BaseException:
        if created:
            store.remove_container(record["name"])
        raise
    store.update_container(record["name"], mountpoint=real)
