"""Fixtures of the image tests: a real registry, test images built here, a private store.

The registry is Debian's ``docker-registry`` (the CNCF distribution registry), started
on 127.0.0.1 with a free port, a temporary storage directory and config file, and
stopped after the module. Test images are OCI layouts made from tar layers written here
(busybox-static plus files) with ``umoci init/new/raw add-layer/config``, pushed with
``skopeo copy``. Every test gets its own store (a temporary ``XDG_DATA_HOME``).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

TOOLS = ("skopeo", "umoci", "docker-registry", "debugfs", "mkfs.ext4")
_missing = [t for t in TOOLS if not (shutil.which(t) or os.path.exists(f"/usr/sbin/{t}")
                                     or os.path.exists(f"/sbin/{t}"))]
if _missing:
    pytestmark = pytest.mark.skip(reason=f"missing {' '.join(_missing)} (scripts/setup-host.sh)")

BUSYBOX = "/bin/busybox"


def tool(name: str) -> str:
    return shutil.which(name) or next(p for p in (f"/usr/sbin/{name}", f"/sbin/{name}")
                                      if os.path.exists(p))


def pyvmm(*args: str, env: dict | None = None, timeout: float = 120,
          **kw) -> subprocess.CompletedProcess:
    """``pyvmm ARGS...`` in a subprocess (real exit status and stderr), text output."""
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.storage = root / "storage"
        self.storage.mkdir()
        self.config = root / "config.yml"
        self.config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n")
        self.host = f"127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.log = open(self.root / "registry.log", "wb")
        self.proc = subprocess.Popen([tool("docker-registry"), "serve", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("docker-registry exited: "
                                   + (self.root / "registry.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("docker-registry did not answer within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def push(self, layout: Path, tag: str, name: str) -> str:
        """Push ``layout:tag`` as ``name`` (repo:tag); returns the manifest digest."""
        digestfile = self.root / "digest"
        subprocess.run([tool("skopeo"), "copy", "-q", "--dest-tls-verify=false",
                        "--digestfile", str(digestfile), f"oci:{layout}:{tag}",
                        f"docker://{self.host}/{name}"], check=True, capture_output=True)
        return digestfile.read_text().strip()

    def blob(self, digest: str) -> Path:
        hexpart = digest.partition(":")[2]
        return (self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart
                / "data")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry"))
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()


# -- test images -----------------------------------------------------------------------

def entry(name: str, data: bytes | None = None, **kw) -> tuple[tarfile.TarInfo, bytes | None]:
    """A tar member and its data: a regular file with ``data``, or what ``type=`` says."""
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644 if data is not None else 0o755
    ti.mtime = 1700000000
    for k, v in kw.items():
        setattr(ti, k, v)
    if data is not None:
        ti.size = len(data)
    return ti, data


def directory(name: str, **kw) -> tuple[tarfile.TarInfo, None]:
    return entry(name, type=tarfile.DIRTYPE, **kw)


def write_layer(path: Path, entries: list[tuple]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in entries:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def busybox_layer() -> list[tuple]:
    """busybox-static as /bin/busybox, /bin/sh and a few applet links, /etc, /tmp."""
    bb = Path(BUSYBOX).read_bytes()
    out = [directory("bin"), entry("bin/busybox", bb, mode=0o755), directory("etc"),
           directory("tmp", mode=0o1777)]
    for applet in ("sh", "cat", "echo", "env", "id", "ls", "pwd", "stat", "test", "true"):
        out.append(entry(f"bin/{applet}", type=tarfile.SYMTYPE, linkname="busybox",
                         mode=0o777))
    return out


def make_image(root: Path, layers: list[list[tuple]], tag: str = "t",
               config: dict | None = None) -> Path:
    """An OCI layout at ``root``/oci holding image ``tag``: the layers in order, then
    the config options (umoci config --config.KEY VALUE; list values repeat the option)."""
    layout = root / "oci"
    umoci = tool("umoci")
    if not layout.exists():
        subprocess.run([umoci, "init", "--layout", str(layout)], check=True)
    subprocess.run([umoci, "new", "--image", f"{layout}:{tag}"], check=True)
    for i, layer in enumerate(layers):
        tar = write_layer(root / f"{tag}-layer{i}.tar", layer)
        subprocess.run([umoci, "raw", "add-layer", "--image", f"{layout}:{tag}", str(tar)],
                       check=True, capture_output=True)
    args = []
    for key, value in (config or {}).items():
        for v in value if isinstance(value, list) else [value]:
            args += [f"--config.{key}", v]
    if args:
        subprocess.run([umoci, "config", "--image", f"{layout}:{tag}", *args], check=True,
                       capture_output=True)
    return layout


@pytest.fixture
def store_env(tmp_path, monkeypatch):
    """A private store: XDG_DATA_HOME in a temporary directory (also for subprocesses)."""
    data = tmp_path / "xdg-data"
    data.mkdir()
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    monkeypatch.delenv("PYVMM_IMAGE_STORE", raising=False)
    return data / "pyvmm" / "images"


def stat_in_image(image: Path, path: str) -> str:
    """``debugfs -R 'stat PATH'`` of the ext4 image (empty if absent)."""
    r = subprocess.run([tool("debugfs"), "-R", f'stat "{path}"', str(image)],
                       capture_output=True, text=True)
    return r.stdout


def tree_listing(root: Path) -> list[tuple[str, int, int]]:
    """Every path under ``root`` with its size and mtime (to compare a store before/after)."""
    out = []
    if root.exists():
        for p in sorted(root.rglob("*")):
            st = p.lstat()
            if p.is_dir():      # a directory's mtime changes as staging comes and goes
                out.append((str(p.relative_to(root)), 0, 0))
            else:
                out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return out
