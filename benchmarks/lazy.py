"""Lazy pulling against a full pull, behind a slow link, in one run.

The image is a debootstrap minbase Debian 12 with python3, in one layer. A
mount of it with `--record-reads` records what `python3 -c 'import json'`
opens; `strata convert --estargz --prefetch` puts those files first, and the
result goes into Debian's docker-registry on 127.0.0.1. Every transfer then
passes a proxy (tests/hostile.py) that adds 20 ms to each request and shares
100 Mbit/s among all blob bytes. Each round starts from an empty store with
the page cache dropped:

  full   `strata pull`, `strata mount --read-only`, then the command
  lazy   `strata mount --lazy --read-only`, then the command
  plain  the same lazy mount of the image as it was (plain gzip, no TOC):
         it streams in while the mount serves; reported are when the
         command started (its exec done), when the pull ended (the layer
         stored) and when the command ended

and reports the time to the command's end, the blob bytes that crossed the
link by then, and the command again on each mount with caches dropped (its
files are local on both: the cost of reading lazily pulled data afterwards).

Usage: tools/run bench lazy [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drivers import drop_caches

from tests.hostile import Misbehaviour, misbehaving_proxy
from tests.images import debootstrap_image
from tests.registry import run_registry

STRATA = [sys.executable, "-m", "unionfs"]
COMMAND = ["python3", "-c", "import json"]
RATE = 100e6 / 8  # 100 Mbit/s
LATENCY = 0.020


def strata(store: str, *args: str) -> None:
    result = subprocess.run([*STRATA, "--root", store, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"strata {' '.join(args)} failed: {result.stderr.strip()}")


def in_chroot(mountpoint: str) -> None:
    subprocess.run(["chroot", mountpoint, *COMMAND], check=True)


def started_then_ended(mountpoint: str, store: str, since: float) -> tuple[float, float, float]:
    """Run the command on a mount whose layer streams in: (when its exec was
    done, when the layer was stored, when it ended), in seconds from *since*."""
    command = subprocess.Popen(["chroot", mountpoint, *COMMAND])
    exec_done = stored = 0.0
    while command.poll() is None or not stored:
        now = time.perf_counter() - since
        if not exec_done:
            try:
                with open(f"/proc/{command.pid}/comm") as handle:
                    if handle.read().strip().startswith("python3"):
                        exec_done = now
            except FileNotFoundError:
                pass
        if not stored and os.listdir(f"{store}/layers"):
            stored = now
        time.sleep(0.005)
    ended = time.perf_counter() - since
    if command.returncode != 0 or not exec_done:
        raise SystemExit("the command failed on the streaming mount")
    return exec_done, stored, ended


def build_image(top: str) -> tuple[str, str]:
    """Debian 12 minbase with python3, packed by umoci as one layer."""
    layout, bundle = debootstrap_image(top, "py", include=["python3"])
    shutil.rmtree(bundle)
    return layout, "py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    top = tempfile.mkdtemp(prefix="strata-bench-lazy-")
    try:
        print("building Debian with python3 (debootstrap) ...", file=sys.stderr)
        layout, tag = build_image(f"{top}/image")
        source = f"{top}/source"
        strata(source, "import", f"oci:{layout}:{tag}", "debian:py")
        recording, reads = f"{top}/record", f"{top}/reads"
        os.makedirs(recording)
        strata(source, "mount", "--read-only", "--record-reads", reads, "debian:py", recording)
        try:
            in_chroot(recording)
        finally:
            strata(source, "umount", recording)
        strata(source, "convert", "--estargz", "--quiet", "debian:py", "debian:esgz",
               "--prefetch", reads)  # fmt: skip
        results: dict[str, list[float]] = {
            key: []
            for key in ("full", "lazy", "lazy ready", "lazy bytes", "full again", "lazy again",
                        "plain started", "plain stored", "plain")
        }  # fmt: skip
        with run_registry(f"{top}/registry") as registry:
            strata(source, "push", "--quiet", "--tls-verify=false", "debian:esgz",
                   f"{registry.host}/debian:esgz")  # fmt: skip
            strata(source, "push", "--quiet", "--tls-verify=false", "debian:py",
                   f"{registry.host}/debian:plain")  # fmt: skip
            sizes = subprocess.run(
                [*STRATA, "--root", source, "images", "--json"], capture_output=True, text=True
            ).stdout
            compressed = next(i["size"] for i in json.loads(sizes) if "debian:esgz" in i["names"])
            plan = Misbehaviour(latency=LATENCY, rate=RATE)
            with misbehaving_proxy(registry.host, plan) as proxy:
                image = f"{proxy}/debian:esgz"
                for number in range(args.rounds):
                    for kind in ("full", "lazy", "plain"):
                        store, mountpoint = f"{top}/{kind}-{number}", f"{top}/mnt-{kind}-{number}"
                        os.makedirs(mountpoint)
                        drop_caches()
                        plan.sent_bytes = 0
                        started = time.perf_counter()
                        if kind == "full":
                            strata(store, "pull", "--quiet", "--tls-verify=false", image)
                            strata(store, "mount", "--read-only", image, mountpoint)
                        elif kind == "plain":
                            strata(store, "mount", "--lazy", "--read-only", "--quiet",
                                   "--tls-verify=false", f"{proxy}/debian:plain",
                                   mountpoint)  # fmt: skip
                            try:
                                times = started_then_ended(mountpoint, store, started)
                            finally:
                                strata(store, "umount", mountpoint)
                            for key, value in zip(("plain started", "plain stored", "plain"),
                                                  times, strict=True):  # fmt: skip
                                results[key].append(value)
                            shutil.rmtree(store)
                            continue
                        else:
                            strata(store, "mount", "--lazy", "--read-only", "--quiet",
                                   "--tls-verify=false", image, mountpoint)  # fmt: skip
                        if kind == "lazy":
                            results["lazy ready"].append(time.perf_counter() - started)
                        try:
                            in_chroot(mountpoint)
                            results[kind].append(time.perf_counter() - started)
                            if kind == "lazy":
                                results["lazy bytes"].append(plan.sent_bytes / compressed)
                            drop_caches()
                            started = time.perf_counter()
                            in_chroot(mountpoint)
                            results[f"{kind} again"].append(time.perf_counter() - started)
                        finally:
                            strata(store, "umount", mountpoint)
                        shutil.rmtree(store)
        median = {key: statistics.median(values) for key, values in results.items()}

        def spread(key: str, unit: str = "s", digits: int = 2) -> str:
            values = results[key]
            return (f"{median[key]:.{digits}f} {unit} ({min(values):.{digits}f}-"
                    f"{max(values):.{digits}f})")  # fmt: skip

        print(f"Debian 12 minbase + python3, {compressed / 2**20:.0f} MiB compressed, eStargz;"
              f" link {RATE * 8 / 1e6:.0f} Mbit/s + {LATENCY * 1000:.0f} ms; {args.rounds}"
              " rounds, medians (min-max)")  # fmt: skip
        print("| measure | value | target |")
        print("|---|---:|---|")
        print(f"| full pull + mount + `import json` | {spread('full')} | |")
        print(f"| lazy mount + `import json` | {spread('lazy')} | |")
        print(f"| of which the lazy mount until it serves | {spread('lazy ready')} | |")
        print(f"| lazy / full | {median['lazy'] / median['full']:.2f}x | at most 0.2x |")
        bytes_values = results["lazy bytes"]
        print(f"| bytes fetched by then / compressed image | {median['lazy bytes']:.1%}"
              f" ({min(bytes_values):.1%}-{max(bytes_values):.1%}) | at most 15% |")  # fmt: skip
        print(f"| `import json` again, caches dropped: ordinary mount |"
              f" {spread('full again', digits=3)} | |")  # fmt: skip
        print(
            f"| same on the lazy mount, data local | {spread('lazy again', digits=3)} |"
            f" {median['lazy again'] / median['full again']:.2f}x, at most 1.2x |"
        )
        print(f"| plain gzip, lazy mount: the command started | {spread('plain started')} |"
              f" before the pull ends |")  # fmt: skip
        print(f"| plain gzip: the pull ended (layer stored) | {spread('plain stored')} | |")
        print(f"| plain gzip: the command ended | {spread('plain')} |"
              f" {median['plain'] / median['full']:.2f}x of full |")  # fmt: skip
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
