"""pyvmm pull / images / rmi against a real registry, with images built by the tests.

No VM: the ext4 images are checked with debugfs and e2fsck.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.image.conftest import (busybox_layer, directory, entry, free_port, make_image,
                                  pyvmm, stat_in_image, tool, tree_listing)

UID_FILE = "home/user/notes.txt"


def rich_layers():
    """Layer 1: busybox, a uid-1000 home, a setuid binary, a device node, a hard link,
    an xattr, a file to be whited out; layer 2: the whiteout, and a new file."""
    lower = busybox_layer() + [
        entry("bin/su", b"#!/bin/sh\n", mode=0o4755),
        directory("home"), directory("home/user", mode=0o700, uid=1000, gid=1000),
        entry(UID_FILE, b"mine\n", mode=0o640, uid=1000, gid=1000),
        entry("home/user/link", type=tarfile.LNKTYPE, linkname=UID_FILE),
        directory("dev"),
        entry("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        entry("etc/xattr", b"x\n", pax_headers={"SCHILY.xattr.user.pyvmm": "yes"}),
        entry("etc/gone", b"deleted in the next layer\n"),
        directory("var"), directory("var/old"), entry("var/old/a", b"a\n"),
    ]
    upper = [directory("etc"), entry("etc/.wh.gone", b""), entry("etc/new", b"new\n"),
             directory("var/old"), entry("var/old/.wh..wh..opq", b""),
             entry("var/old/b", b"b\n")]
    return [lower, upper]


CONFIG = {"entrypoint": "/bin/echo", "cmd": ["hello", "world"], "env": ["GREETING=hi"],
          "workingdir": "/home", "label": "org.example=test"}


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    """The rich test image, pushed to the registry as rich:1; (reference, digest, layout)."""
    root = tmp_path_factory.mktemp("img")
    layout = make_image(root, rich_layers(), config=CONFIG)
    digest = registry.push(layout, "t", "test/rich:1")
    return f"{registry.host}/test/rich:1", digest, layout


def check_rich_rootfs(rootfs):
    new = stat_in_image(rootfs, "/etc/new")
    assert "Type: regular" in new
    assert stat_in_image(rootfs, "/etc/gone") == ""              # whiteout
    assert stat_in_image(rootfs, "/var/old/a") == ""             # opaque directory
    assert "Type: regular" in stat_in_image(rootfs, "/var/old/b")
    owned = stat_in_image(rootfs, "/" + UID_FILE)
    assert "User:  1000   Group:  1000" in owned and "Mode:  0640" in owned
    assert "Links: 2" in owned
    assert owned.split()[1] == stat_in_image(rootfs, "/home/user/link").split()[1]  # inode
    assert "User:  1000   Group:  1000" in stat_in_image(rootfs, "/home/user")
    su = stat_in_image(rootfs, "/bin/su")
    assert "Mode:  04755" in su and "User:     0   Group:     0" in su
    null = stat_in_image(rootfs, "/dev/null")
    assert "Type: character special" in null and "Mode:  0666" in null
    assert "Device major/minor number: 01:03" in null
    assert "Type: symlink" in stat_in_image(rootfs, "/bin/sh")
    xattr = stat_in_image(rootfs, "/etc/xattr")
    assert 'user.pyvmm (3) = "yes"' in xattr
    assert "rootlesscontainers" not in stat_in_image(rootfs, "/home/user")
    root = stat_in_image(rootfs, "/")
    assert "User:     0   Group:     0" in root
    fsck = subprocess.run([tool("e2fsck"), "-fn", str(rootfs)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def stored(store, digest):
    path = store / ("sha256-" + digest.partition(":")[2])
    assert path.is_dir()
    return path


def test_pull_by_tag(pushed, store_env):
    ref, digest, _ = pushed
    r = pyvmm("pull", "--tls-verify=false", ref)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest
    path = stored(store_env, digest)
    check_rich_rootfs(path / "rootfs.ext4")
    config = json.loads((path / "config.json").read_text())["config"]
    assert config["Entrypoint"] == ["/bin/echo"] and config["Env"][-1] == "GREETING=hi"
    index = json.loads((store_env / "index.json").read_text())
    assert index["tags"] == {ref: digest}
    listing = pyvmm("images")
    assert ref in listing.stdout and digest[7:19] in listing.stdout
    # A second pull of the same image: same directory, nothing left in staging.
    r = pyvmm("pull", "--tls-verify=false", "docker://" + ref)
    assert r.returncode == 0, r.stderr
    assert os.listdir(store_env / ".tmp") == []
    assert [p.name for p in store_env.iterdir() if p.name.startswith("sha256-")] == \
        [path.name]


def test_pull_by_digest(pushed, registry, store_env):
    ref, digest, _ = pushed
    r = pyvmm("pull", "--tls-verify=false", f"{registry.host}/test/rich@{digest}")
    assert r.returncode == 0, r.stderr
    stored(store_env, digest)
    assert json.loads((store_env / "index.json").read_text())["tags"] == {}
    assert "<none>" in pyvmm("images").stdout
    r = pyvmm("rmi", digest[7:19])
    assert r.returncode == 0, r.stderr
    assert not (store_env / ("sha256-" + digest[7:])).exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to switch to an unprivileged user")
def test_pull_unprivileged_keeps_owners_and_modes(pushed):
    """As nobody (uid 65534): umoci --rootless records owners in xattrs, and the ext4
    image still has uid 1000, the setuid bit and the device node."""
    import tempfile
    ref, digest, layout = pushed
    top = tempfile.mkdtemp(prefix="pyvmm-nobody-")   # pytest's tmp_path is root's only
    try:
        os.chmod(top, 0o755)
        data = os.path.join(top, "data")
        os.mkdir(data)
        os.chown(data, 65534, 65534)
        _pull_as_nobody(ref, digest, Path(data))
    finally:
        shutil.rmtree(top)


def _pull_as_nobody(ref, digest, data):
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(data),
           "XDG_DATA_HOME": str(data), "PYTHONPATH": here, "PYTHONDONTWRITEBYTECODE": "1"}
    # The venv's interpreter may live where nobody cannot read (root's pyenv): the
    # system one runs vmm from the checkout (quiet pull: no rich needed).
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        python, "-m", "vmm.cli", "pull", "-q", "--tls-verify=false", ref],
                       capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"the system python cannot run vmm as nobody: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    store = data / "pyvmm" / "images"
    rootfs = stored(store, digest) / "rootfs.ext4"
    assert os.stat(rootfs).st_uid == 65534
    check_rich_rootfs(rootfs)


def test_pull_from_files(pushed, tmp_path, store_env):
    """oci: layouts and oci-archive:/docker-archive: files (what podman save writes)."""
    ref, digest, layout = pushed
    r = pyvmm("pull", f"oci:{layout}:t")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest
    archive = tmp_path / "img.tar"
    subprocess.run([tool("skopeo"), "copy", "-q", f"oci:{layout}:t",
                    f"docker-archive:{archive}:test/rich:1"], check=True)
    r = pyvmm("pull", f"docker-archive:{archive}")
    assert r.returncode == 0, r.stderr
    check_rich_rootfs(stored(store_env, r.stdout.strip()) / "rootfs.ext4")
    names = json.loads((store_env / "index.json").read_text())["tags"]
    assert set(names) == {f"oci:{layout}:t", f"docker-archive:{archive}"}


def one_line_failure(r):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: "), r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def populated(pushed, store_env):
    """A store holding one image, and its listing before the failure under test."""
    ref, digest, layout = pushed
    assert pyvmm("pull", "-q", f"oci:{layout}:t").returncode == 0
    return store_env, tree_listing(store_env)


@pytest.mark.parametrize("ref", ["UPPER/case:1", "a b", "x:", "host:5000/x:bad tag",
                                 "oci:", "registry/x@sha256:1234"])
def test_bad_reference(populated, ref):
    store, before = populated
    one_line_failure(pyvmm("pull", ref))
    assert tree_listing(store) == before


def test_unreachable_registry(populated):
    store, before = populated
    r = pyvmm("pull", "--tls-verify=false", f"127.0.0.1:{free_port()}/x:1")
    one_line_failure(r)
    assert "connection refused" in r.stderr
    assert tree_listing(store) == before


def test_corrupt_layer(registry, tmp_path, populated):
    store, before = populated
    layout = make_image(tmp_path, [busybox_layer() + [entry("etc/c", b"c" * 5000)]])
    digest = registry.push(layout, "t", "test/corrupt:1")
    manifest = json.loads(registry.blob(digest).read_bytes())
    blob = registry.blob(manifest["layers"][-1]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xff
    blob.write_bytes(bytes(data))
    r = pyvmm("pull", "--tls-verify=false", f"{registry.host}/test/corrupt:1")
    one_line_failure(r)
    assert "digest" in r.stderr.lower()
    assert tree_listing(store) == before


def test_failure_after_unpack_leaves_store(tmp_path, populated):
    """A name debugfs cannot be given (a quote) fails after fetch, unpack and mkfs."""
    store, before = populated
    layout = make_image(tmp_path, [busybox_layer() + [entry('etc/a"b', b"q\n", uid=1000)]])
    r = pyvmm("pull", f"oci:{layout}:t")
    one_line_failure(r)
    assert "not supported" in r.stderr
    assert tree_listing(store) == before


def test_rmi(pushed, store_env, tmp_path):
    ref, digest, layout = pushed
    assert pyvmm("pull", "-q", f"oci:{layout}:t").returncode == 0
    assert pyvmm("pull", "-q", f"oci:{layout}:t2").returncode == 2   # no such tag
    shutil.copytree(layout, tmp_path / "copy")
    assert pyvmm("pull", "-q", f"oci:{tmp_path / 'copy'}:t").returncode == 0
    r = pyvmm("rmi", f"oci:{layout}:t")                 # one of two tags: image stays
    assert r.returncode == 0 and "Deleted" not in r.stdout, r.stdout + r.stderr
    assert (store_env / ("sha256-" + digest[7:])).is_dir()
    one_line_failure(pyvmm("rmi", "no/such:image"))
    r = pyvmm("rmi", f"oci:{tmp_path / 'copy'}:t")      # the last tag: image goes
    assert r.returncode == 0 and f"Deleted: {digest}" in r.stdout, r.stdout + r.stderr
    assert not (store_env / ("sha256-" + digest[7:])).exists()
    assert json.loads((store_env / "index.json").read_text())["tags"] == {}


def test_concurrent_pulls(pushed, registry, store_env):
    """Four processes pull at once (two by tag, two by digest): one image, one tag."""
    ref, digest, _ = pushed
    import sys
    procs = [subprocess.Popen([sys.executable, "-m", "vmm.cli", "pull", "-q",
                               "--tls-verify=false",
                               ref if i % 2 else f"{registry.host}/test/rich@{digest}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    for p in procs:
        out, errs = p.communicate(timeout=120)
        assert p.returncode == 0, errs
        assert out.strip() == digest
    assert [p.name for p in store_env.iterdir() if p.name.startswith("sha256-")] == \
        ["sha256-" + digest[7:]]
    assert json.loads((store_env / "index.json").read_text())["tags"] == {ref: digest}
    assert os.listdir(store_env / ".tmp") == []


def test_push_then_pull_round_trips(pushed, registry, store_env):
    """An image pulled from a file, pushed to the registry, pulled back from there: the
    same manifest digest, and the registry serves it to skopeo as any image."""
    ref, digest, layout = pushed
    assert pyvmm("pull", "-q", f"oci:{layout}:t").returncode == 0
    dest = f"{registry.host}/test/pushed:2"
    r = pyvmm("push", "--tls-verify=false", f"oci:{layout}:t", dest)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == digest
    inspect = subprocess.run([tool("skopeo"), "inspect", "--tls-verify=false",
                              f"docker://{dest}"], capture_output=True, text=True, check=True)
    assert json.loads(inspect.stdout)["Digest"] == digest
    shutil.rmtree(store_env)
    r = pyvmm("pull", "-q", "--tls-verify=false", dest)
    assert r.returncode == 0 and r.stdout.strip() == digest, r.stderr
    check_rich_rootfs(stored(store_env, digest) / "rootfs.ext4")
    one_line_failure(pyvmm("push", "no/such:image", dest))
    one_line_failure(pyvmm("push", "--tls-verify=false", dest, f"127.0.0.1:{free_port()}/x:1"))


def test_zstd_layers(pushed, tmp_path, store_env):
    """zstd-compressed layers (umoci 0.4.7 cannot apply them: a gzip copy is unpacked,
    the store keeps the image as pulled, with its own digest)."""
    ref, digest, layout = pushed
    zstd = tmp_path / "zstd"
    subprocess.run([tool("skopeo"), "copy", "-q", "--dest-compress",
                    "--dest-compress-format", "zstd", f"oci:{layout}:t", f"oci:{zstd}:t"],
                   check=True)
    r = pyvmm("pull", "-q", f"oci:{zstd}:t")
    assert r.returncode == 0, r.stderr
    path = stored(store_env, r.stdout.strip())
    manifest = json.loads((path / "oci" / "index.json").read_text())["manifests"][0]
    assert manifest["digest"] == r.stdout.strip() != digest
    check_rich_rootfs(path / "rootfs.ext4")


def test_stale_staging_is_removed(pushed, store_env):
    """What a killed pull left (a staging directory of a process that is gone) goes at
    the next change to the store; a live process's staging stays."""
    ref, digest, layout = pushed
    stale = store_env / ".tmp" / "999999999-dead"
    live = store_env / ".tmp" / f"{os.getppid()}-live"
    for d in (stale, live):
        (d / "rootfs").mkdir(parents=True)
    assert pyvmm("pull", "-q", f"oci:{layout}:t").returncode == 0
    assert not stale.exists() and live.exists()
