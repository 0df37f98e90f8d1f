"""Shared fixtures: KVM availability, tiny guests, the cached default Linux guest."""

from __future__ import annotations

import os

import pytest


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm"
    return None


requires_kvm = pytest.mark.skipif(kvm_usable() is not None, reason=kvm_usable() or "")


@pytest.fixture(scope="session")
def tiny():
    """Builds (cached) and returns the path of a bare-metal test guest by name."""
    from vmm import tinyguest
    return tinyguest.build


def pytest_collection_finish(session):
    """Build the default Linux guest (cached: once per kernel config) before the first
    Linux test starts, so the build's minutes don't count against a test's timeout."""
    if kvm_usable() is not None or not any(item.get_closest_marker("linux") for item in session.items):
        return
    from vmm import guestbuild
    try:
        guestbuild.default_guest()
    except guestbuild.GuestBuildError:
        pass  # the Linux tests' own fixtures report it as their skip reason
