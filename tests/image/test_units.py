"""The pieces of vmm.image without tools: references, the rootless owner xattr, the
image config, the device-node scan's whiteouts, the store's index checks."""

from __future__ import annotations

import json
import tarfile

import pytest

from tests.image.conftest import directory, entry, write_layer
from vmm.image.config import ConfigError, ImageConfig
from vmm.image.pull import PullError, Reference, device_nodes, rootless_owner
from vmm.image.store import Store, StoreError

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,source,name,digest", [
    ("busybox", "docker://busybox:latest", "busybox:latest", None),
    ("127.0.0.1:5000/a/b:1", "docker://127.0.0.1:5000/a/b:1", "127.0.0.1:5000/a/b:1", None),
    ("docker://h/x:2", "docker://h/x:2", "h/x:2", None),
    (f"h/x@{DIGEST}", f"docker://h/x@{DIGEST}", None, DIGEST),
    (f"h/x:3@{DIGEST}", f"docker://h/x:3@{DIGEST}", "h/x:3", DIGEST),
    ("oci:/d:tag", "oci:/d:tag", "oci:/d:tag", None),
    ("docker-archive:/f.tar", "docker-archive:/f.tar", "docker-archive:/f.tar", None),
])
def test_reference(text, source, name, digest):
    r = Reference(text)
    assert (r.source, r.name, r.digest) == (source, name, digest)


@pytest.mark.parametrize("text", ["", "a/B", "x:", "x y", "h/x@sha256:12", "oci:",
                                  "-x", "x/:1"])
def test_bad_reference(text):
    with pytest.raises(PullError):
        Reference(text)


def test_rootless_owner():
    assert rootless_owner(None) == (0, 0)
    assert rootless_owner(b"\x08\xe8\x07\x10\xe8\x07") == (1000, 1000)   # umoci's bytes
    assert rootless_owner(b"\x10\x05") == (0, 5)
    assert rootless_owner(b"\x08\x80\x80\x04") == (65536, 0)
    for bad in (b"\x08", b"\x0a\x01", b"\x08\x80"):
        with pytest.raises(ValueError):
            rootless_owner(bad)


def test_image_config():
    c = ImageConfig.from_json(json.dumps({
        "created": "2026-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "A=1=2"], "Entrypoint": ["/e"], "Cmd": ["c", "d"],
                   "WorkingDir": "/w", "User": "1000:1000", "Labels": {"k": "v"}}}))
    assert c.command() == ["/e", "c", "d"] and c.command(["x"]) == ["/e", "x"]
    assert c.environment({"A": "3"}) == {"PATH": "/bin", "A": "3"}
    assert c.environment()["A"] == "1=2"
    assert (c.workdir, c.user, c.labels) == ("/w", "1000:1000", {"k": "v"})
    empty = ImageConfig.from_json(b"{}")
    assert empty.command() == [] and empty.environment() == {}
    for bad in (b"[]", b"{", b'{"config": {"Env": "A=1"}}', b'{"config": {"Env": ["A"]}}',
                b'{"config": {"Cmd": [1]}}', b'{"config": {"User": 0}}',
                b'{"config": {"Labels": {"a": 1}}}', b'{"config": []}'):
        with pytest.raises(ConfigError):
            ImageConfig.from_json(bad)


def test_device_nodes_whiteouts(tmp_path):
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    import hashlib
    layers = []
    for i, members in enumerate([
        [directory("dev"), entry("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
         entry("dev/zero", type=tarfile.CHRTYPE, devmajor=1, devminor=5),
         entry("dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0, uid=6),
         directory("o"), entry("o/c", type=tarfile.CHRTYPE, devmajor=4, devminor=1),
         entry("r", type=tarfile.CHRTYPE, devmajor=4, devminor=2)],
        [entry("dev/.wh.zero", b""), entry("o/.wh..wh..opq", b""),
         entry("o/d", type=tarfile.CHRTYPE, devmajor=4, devminor=3), entry("r", b"file")],
    ]):
        tar = write_layer(tmp_path / f"l{i}.tar", members)
        digest = hashlib.sha256(tar.read_bytes()).hexdigest()
        tar.rename(blobs / digest)
        layers.append({"digest": f"sha256:{digest}"})
    devs = device_nodes(tmp_path, layers)
    assert sorted(devs) == ["dev/null", "dev/sda", "o/d"]
    assert devs["dev/sda"][:3] == ("b", 8, 0) and devs["dev/sda"][4] == 6


def test_store_refuses_a_foreign_index(tmp_path):
    (tmp_path / "index.json").write_text('{"version": 99, "tags": {}}')
    with pytest.raises(StoreError, match="not a pyvmm image index"):
        Store(tmp_path).images()
    (tmp_path / "index.json").write_text('{"version": 1, "tags": {"a": "../etc"}}')
    with pytest.raises(StoreError):
        Store(tmp_path).resolve("a")
    assert Store(tmp_path / "none").images() == []
    with pytest.raises(StoreError, match="no such image"):
        Store(tmp_path / "none").remove("x")
