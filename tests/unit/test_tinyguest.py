"""vmm.tinyguest: a change to a header the C guests include rebuilds them (the cache
key covers guests/tiny/*.h, not only the guest's own source)."""

from __future__ import annotations

import shutil

import pytest

from vmm import tinyguest


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("ld") is None,
                    reason="needs gcc and ld")
@pytest.mark.parametrize("header", ["virtio_mmio.h", "tiny.h"])
def test_header_change_changes_the_cached_build(tmp_path, monkeypatch, header):
    src = tmp_path / "tiny"
    shutil.copytree(tinyguest.SOURCE_DIR, src)
    monkeypatch.setattr(tinyguest, "SOURCE_DIR", src)
    monkeypatch.setattr(tinyguest, "cache_dir", lambda: tmp_path / "cache")
    first = tinyguest.build("blkinflight")
    assert tinyguest.build("blkinflight") == first            # cached
    with open(src / header, "a") as f:
        f.write("\n/* changed */\n")
    second = tinyguest.build("blkinflight")
    assert second != first and second.is_file()
