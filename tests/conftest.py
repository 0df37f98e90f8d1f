"""Shared fixtures: KVM availability, tiny guests, the cached default Linux guest."""

from __future__ import annotations

import pytest

from vmm.pytest_plugin import kvm_unusable as kvm_usable  # None if usable, else why not


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
