#!/usr/bin/env python3
"""How long images take: ``pyvmm pull`` against ``skopeo copy`` alone, ``run --image``.

Measures, in one run on this host, with a local registry (Debian's docker-registry on
127.0.0.1, started and stopped here) and a test image made here (busybox-static plus
``--files`` files of 16 KiB random data, two layers):
  * ``skopeo copy docker://... oci:DIR`` alone: the floor (the fetch pyvmm starts with);
  * ``pyvmm pull`` into an empty store (fetch + umoci unpack + mkfs.ext4 + debugfs);
    the ratio pull / skopeo is what pyvmm's own steps cost on top of the fetch;
  * with ``--run``: ``pyvmm run --image REF -- true`` cold (image not in the store:
    pull + boot) and warm (in the store: boot only), one Linux boot each;
  * with ``--build``: ``pyvmm build`` of FROM that image + one RUN (a boot), then the
    same build again with nothing changed (all steps cached: no guest).
Median of ``--runs`` for the first two. Prints a rich table, then one line per figure:
``bench_image <name> <milliseconds>``. Compare figures only within one run.

    python scripts/bench_image.py [--runs 3] [--files 500] [--run] [--build]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.image.conftest import Registry, busybox_layer, directory, entry, make_image, tool  # noqa: E402


def timed(argv: list[str], env: dict | None = None) -> float:
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800,
                       stdin=subprocess.DEVNULL)
    ms = (time.monotonic() - t0) * 1000
    if p.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--run", action="store_true", help="also pyvmm run --image (two boots)")
    ap.add_argument("--build", action="store_true",
                    help="also pyvmm build with one RUN step, then a no-change rebuild (one boot)")
    a = ap.parse_args()
    pyvmm = [sys.executable, "-m", "vmm.cli"]
    work = Path(tempfile.mkdtemp(prefix="pyvmm-bench-image-"))
    (work / "registry").mkdir()
    reg = Registry(work / "registry")
    figures: dict[str, list[float]] = {}
    try:
        reg.start()
        payload = [directory("data")] + [entry(f"data/f{i}", os.urandom(16384))
                                         for i in range(a.files)]
        layout = make_image(work, [busybox_layer(), payload],
                            config={"cmd": ["/bin/true"]})
        ref = f"{reg.host}/bench/image:1"
        reg.push(layout, "t", "bench/image:1")
        for i in range(a.runs):
            dest = work / f"skopeo-{i}"
            figures.setdefault("skopeo_copy", []).append(timed(
                [tool("skopeo"), "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                 f"oci:{dest}:img"]))
            shutil.rmtree(dest)
            env = dict(os.environ, XDG_DATA_HOME=str(work / f"store-{i}"))
            env.pop("PYVMM_IMAGE_STORE", None)
            figures.setdefault("pyvmm_pull", []).append(timed(
                [*pyvmm, "pull", "-q", "--tls-verify=false", ref], env))
            shutil.rmtree(work / f"store-{i}")
        if a.run:
            env = dict(os.environ, XDG_DATA_HOME=str(work / "store-run"))
            env.pop("PYVMM_IMAGE_STORE", None)
            # cold: not in the store, so run --image pulls it first (from the oci:
            # layout: run --image has no --tls-verify for the local registry).
            figures["run_image_cold"] = [timed(
                [*pyvmm, "run", "--image", f"oci:{layout}:t", "--", "true"], env)]
            figures["run_image_warm"] = [timed(
                [*pyvmm, "run", "--image", f"oci:{layout}:t", "--", "true"], env)]
        if a.build:
            env = dict(os.environ, XDG_DATA_HOME=str(work / "store-build"))
            env.pop("PYVMM_IMAGE_STORE", None)
            timed([*pyvmm, "pull", "-q", f"oci:{layout}:t"], env)
            ctx = work / "ctx"
            ctx.mkdir()
            (ctx / "Containerfile").write_text(f"FROM oci:{layout}:t\nRUN echo built > /made\n")
            figures["build_first"] = [timed([*pyvmm, "build", "-t", "b:1", str(ctx)], env)]
            figures["build_nochange"] = [timed([*pyvmm, "build", "-t", "b:1", str(ctx)], env)]
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in figures.items()}
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"images ({a.files} files of 16 KiB + busybox, median of {a.runs})")
    for col in ("figure", "ms", "vs skopeo copy"):
        t.add_column(col)
    for k, v in med.items():
        t.add_row(k, f"{v:.0f}", f"{v / med['skopeo_copy']:.2f}x")
    Console(stderr=True).print(t)
    for k, v in med.items():
        print(f"bench_image {k} {v:.1f}")


if __name__ == "__main__":
    main()
