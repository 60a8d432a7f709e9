"""`strata bench`: strata beside its peers on the same work, in one run.

Builds each workload's fixture once, then runs every workload on every
driver, a fresh mount each time, for several rounds with the drivers in
rotated order (so no driver always runs first, on the coldest machine).
Writes DIR/results.json (every sample, versions, kernel, machine, load),
DIR/results.md (median, spread and strata's ratio to each peer) and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from drivers import DRIVERS, PEERS, drop_caches, missing
from workloads import WORKLOADS, Workload

# metric -> driver -> samples
Samples = dict[str, dict[str, list[float]]]


def higher_is_better(metric: str) -> bool:
    return metric.endswith("/s)")


def _command_version(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    result = subprocess.run(command, capture_output=True, text=True)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else None


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        memory_kib = int(handle.readline().split()[1])
    import pyfuse3

    from unionfs import __version__

    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "versions": {
            "strata": __version__,
            "pyfuse3": getattr(pyfuse3, "__version__", "unknown"),
            "fuse-overlayfs": _command_version(["fuse-overlayfs", "--version"]),
            "unionfs-fuse": _command_version(["unionfs", "--version"]),
        },
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="strata bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    known = ", ".join(f"{w.id} {w.name}" for w in WORKLOADS)
    parser.add_argument(
        "--drivers", default=",".join(DRIVERS), help=f"comma-separated, of: {', '.join(DRIVERS)}"
    )
    parser.add_argument("--only", default="", help=f"workloads by id or name, of: {known}")
    parser.add_argument(
        "--quick", action="store_true", help="small fixtures and one round: the suite works"
    )
    parser.add_argument("--rounds", type=int, default=None, help="default 3; 1 with --quick")
    parser.add_argument("--out", default="bench-results", help="directory for the results")
    return parser.parse_args(argv)


def _chosen(only: str) -> list[Workload]:
    if not only:
        return list(WORKLOADS)
    wanted = [item.strip() for item in only.split(",") if item.strip()]
    known = {key: w for w in WORKLOADS for key in (w.id.lower(), w.name)}
    unknown = [item for item in wanted if item.lower() not in known]
    if unknown:
        raise SystemExit(f"strata bench: unknown workload {', '.join(unknown)}")
    return [known[item.lower()] for item in wanted]


def run(args: argparse.Namespace) -> dict[str, Any]:
    workloads = _chosen(args.only)
    drivers, notes = [], []
    for driver in [item.strip() for item in args.drivers.split(",") if item.strip()]:
        reason = missing(driver)
        if reason is None:
            drivers.append(driver)
        else:
            notes.append(f"{driver} skipped: {reason}")
            print(f"strata bench: {driver} skipped: {reason}", file=sys.stderr)
    if not drivers:
        raise SystemExit("strata bench: no driver can run here")
    if not drop_caches():
        notes.append("caches could not be dropped: 'cold' figures are warm")
    rounds = args.rounds or (1 if args.quick else 3)
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "arguments": {
            "drivers": drivers,
            "workloads": [w.id for w in workloads],
            "quick": args.quick,
            "rounds": rounds,
        },
        "load_average_before": os.getloadavg(),
        "notes": notes,
        "workloads": {},
    }
    # Short paths: the kernel takes at most one page of mount options.
    top = tempfile.mkdtemp(prefix="sb", dir="/tmp")
    try:
        for workload in workloads:
            print(f"{workload.id} {workload.title}: building the fixture", file=sys.stderr)
            fixture = workload.build(os.path.join(top, workload.id), args.quick)
            samples: Samples = {}
            for number in range(rounds):
                order = drivers[number % len(drivers) :] + drivers[: number % len(drivers)]
                for driver in order:
                    if driver not in workload.drivers:
                        continue
                    scratch = os.path.join(top, f"{workload.id}-{driver}-{number}")
                    os.makedirs(scratch)
                    print(f"  round {number + 1}/{rounds}: {driver}", file=sys.stderr)
                    metrics = workload.run(driver, fixture, scratch, args.quick)
                    shutil.rmtree(scratch)
                    for metric, value in metrics.items():
                        samples.setdefault(metric, {}).setdefault(driver, []).append(value)
            results["workloads"][workload.id] = {
                "name": workload.name, "title": workload.title, "samples": samples
            }  # fmt: skip
            # Some fixtures are kept elsewhere (W9's rootfs is cached across runs).
            if os.path.isdir(os.path.join(top, workload.id)):
                shutil.rmtree(os.path.join(top, workload.id))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()
    return results


def _cell(values: list[float], metric: str) -> str:
    median = statistics.median(values)
    digits = 0 if median >= 100 else 1 if median >= 10 else 2 if median >= 1 else 3
    text = f"{median:,.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    return text


def ratio(metric: str, strata: list[float], peer: list[float]) -> float:
    """strata's cost over the peer's: below 1, strata is faster."""
    ours, theirs = statistics.median(strata), statistics.median(peer)
    if higher_is_better(metric):
        return theirs / ours
    return ours / theirs if theirs else float("inf")


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"strata bench, {results['started']}; {machine['cpus']} x {machine['cpu']}, "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}; "
        f"{results['arguments']['rounds']} round(s), medians (min-max); "
        "ratio = strata's cost / the peer's (below 1: strata is faster).",
        "",
    ]
    lines += [f"- {note}" for note in results["notes"]]
    for workload_id, workload in results["workloads"].items():
        lines += ["", f"### {workload_id} {workload['title']}", ""]
        ran = {driver for by_driver in workload["samples"].values() for driver in by_driver}
        drivers = [driver for driver in results["arguments"]["drivers"] if driver in ran]
        peers = [peer for peer in PEERS if peer in ran and "strata" in ran]
        header = ["metric", *drivers, *(f"strata / {peer}" for peer in peers)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---" + "|---:" * (len(header) - 1) + "|")
        for metric, by_driver in workload["samples"].items():
            cells = [_cell(by_driver[d], metric) if d in by_driver else "-" for d in drivers]
            for peer in peers:
                if "strata" in by_driver and peer in by_driver:
                    cells.append(f"{ratio(metric, by_driver['strata'], by_driver[peer]):.2f}x")
                else:
                    cells.append("-")
            name = metric.replace("|", "\\|")  # a pipe in a command would end the cell
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: str) -> list[str]:
    """PNG plots of the workloads that have a curve; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    workloads = results["workloads"]
    drivers: list[str] = results["arguments"]["drivers"]

    def curve(workload_id: str, pattern: str, xs: list[int], title: str, xlabel: str,
              ylabel: str, name: str, log_x: bool = False) -> None:  # fmt: skip
        samples = workloads.get(workload_id, {}).get("samples", {})
        figure, axes = plt.subplots(figsize=(6, 4))
        for driver in drivers:
            points = [(x, statistics.median(samples[pattern.format(x=x)][driver]))
                      for x in xs if driver in samples.get(pattern.format(x=x), {})]  # fmt: skip
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=driver)
        if log_x:
            axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
        axes.legend()
        figure.tight_layout()
        path = os.path.join(out, name)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)

    if "W1" in workloads:
        depths = sorted({int(m.split(",")[1].split()[0]) for m in workloads["W1"]["samples"]})
        curve("W1", "stat, {x} layers, cold (µs)", depths, "Cold lookup against stack depth",
              "layers", "µs per stat", "lookup-depth.png", log_x=True)  # fmt: skip
    if "W5" in workloads:
        firsts = [m for m in workloads["W5"]["samples"] if m.startswith("first 4 KiB")]
        sizes = sorted({int(m.split(" a ")[1].split()[0].replace(",", "")) for m in firsts})
        curve("W5", "first 4 KiB write into a {x:,} MiB lower file (ms)", sizes,
              "First write into a lower file (copy-up)", "file size (MiB)", "ms",
              "copy-up.png", log_x=True)  # fmt: skip
    if "W4" in workloads:
        samples = workloads["W4"]["samples"]
        rates = [m for m in samples if higher_is_better(m)]
        ran = [d for d in drivers if any(d in samples[m] for m in rates)]
        figure, axes = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(len(ran), 1)
        for number, driver in enumerate(ran):
            values = [statistics.median(samples[m][driver]) if driver in samples[m] else 0
                      for m in rates]  # fmt: skip
            axes.bar([i + number * width for i in range(len(rates))], values, width, label=driver)
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(rates))])
        labels = ["create+write+close", "the same, last tenth", "unlink"]
        axes.set_xticklabels(labels if len(rates) == len(labels) else rates, fontsize=8)
        axes.set_yscale("log")
        axes.set(title="Small files (higher is better)", ylabel="files/s")
        axes.legend()
        figure.tight_layout()
        path = os.path.join(out, "small-files.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("strata bench: needs root (it mounts overlayfs and drops caches)", file=sys.stderr)
        return 2
    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1, ensure_ascii=False)
    table = markdown(results)
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write(table)
    written = plots(results, args.out)
    print(table)
    print(f"strata bench: wrote results.json, results.md and {len(written)} plot(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
