"""pytest plugin: a ``guest`` fixture that runs commands in a disposable pyvmm guest.

Registered through the ``pytest11`` entry point in pyproject.toml, so installing pyvmm
makes it available to every pytest run::

    def test_uname(guest):
        r = guest.run("uname -m")
        assert r.exit_code == 0 and r.stdout == b"x86_64\\n"

    @pytest.mark.pyvmm(mem="512M", kernel="build/vmlinux", initrd="build/initramfs.cpio")
    def test_big(guest): ...

Options:
  * ``--pyvmm-scope=function|class|module|package|session`` or the ini option
    ``pyvmm_guest_scope`` (default ``module``): how long one booted guest is shared.
    Tests sharing a guest see each other's files; pick ``function`` for isolation.
  * ``--pyvmm-kernel`` / ``--pyvmm-initrd`` / ini ``pyvmm_mem``: defaults for every guest.
  * marker ``@pytest.mark.pyvmm(kernel=..., initrd=..., mem=..., cmdline=...)`` on a test,
    class or module (closest wins); tests with different settings get different guests.

Tests skip (with the reason) when /dev/kvm is missing or not usable. When a test that
used a guest fails, its report gets a "pyvmm guest console" section with the tail of
the guest's serial console. A guest whose command timed out is gone; the next test
that asks for one gets a fresh guest.

Only pytest and os are imported at module level: the plugin loads in every pytest run.
"""

from __future__ import annotations

import os

import pytest

SCOPES = ("function", "class", "module", "package", "session")
MARKER_KEYS = ("kernel", "initrd", "mem", "cmdline")
CONSOLE_TAIL = 3000


def pytest_addoption(parser) -> None:
    group = parser.getgroup("pyvmm", "pyvmm disposable guests")
    group.addoption("--pyvmm-scope", choices=SCOPES, default=None,
                    help="how long one booted guest is shared (default: ini pyvmm_guest_scope)")
    group.addoption("--pyvmm-kernel", default=None, help="kernel for the guest fixture")
    group.addoption("--pyvmm-initrd", default=None, help="initramfs for the guest fixture")
    parser.addini("pyvmm_guest_scope", "scope of the pyvmm guest fixture", default="module")
    parser.addini("pyvmm_mem", "guest RAM for the pyvmm guest fixture", default="256M")


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "pyvmm(kernel=None, initrd=None, mem=None, cmdline=None): settings of "
                   "the guest the `guest` fixture boots for this test, class or module")


def kvm_unusable() -> str | None:
    """Why /dev/kvm cannot be used here, or None."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm (add yourself to the kvm group)"
    return None


def _scope(fixture_name: str, config) -> str:
    scope = config.getoption("pyvmm_scope") or config.getini("pyvmm_guest_scope")
    if scope not in SCOPES:
        raise pytest.UsageError(f"pyvmm_guest_scope = {scope!r}: use one of {', '.join(SCOPES)}")
    return scope


class GuestPool:
    """The guests of one scope, one per distinct setting; all closed at scope end."""

    def __init__(self, config):
        self.config = config
        self.guests: dict[tuple, object] = {}

    def settings(self, node) -> dict:
        marker = node.get_closest_marker("pyvmm")
        kw = dict(marker.kwargs) if marker else {}
        unknown = set(kw) - set(MARKER_KEYS)
        if unknown:
            raise pytest.UsageError(f"@pytest.mark.pyvmm: unknown argument(s) {sorted(unknown)}; "
                                    f"use {', '.join(MARKER_KEYS)}")
        return {
            "kernel": kw.get("kernel") or self.config.getoption("pyvmm_kernel"),
            "initrd": kw.get("initrd") or self.config.getoption("pyvmm_initrd"),
            "mem": kw.get("mem") or self.config.getini("pyvmm_mem"),
            "cmdline": kw.get("cmdline") or "",
        }

    def get(self, settings: dict):
        from vmm.guest import Guest
        key = tuple(sorted((k, str(v)) for k, v in settings.items()))
        g = self.guests.get(key)
        if g is not None and not g.alive:
            g.close()
            g = None
        if g is None:
            g = self.guests[key] = Guest(**settings)
            g.start()
        return g

    def close(self) -> None:
        for g in self.guests.values():
            g.close()
        self.guests.clear()


@pytest.fixture(scope=_scope)
def pyvmm_guest_pool(request):
    """The guests shared at the configured scope (see the module docstring)."""
    why = kvm_unusable()
    if why:
        pytest.skip(f"pyvmm guest: {why}")
    pool = GuestPool(request.config)
    yield pool
    pool.close()


@pytest.fixture
def guest(request, pyvmm_guest_pool):
    """A booted vmm.Guest (shared at the configured scope): ``guest.run(cmd)``."""
    settings = pyvmm_guest_pool.settings(request.node)
    try:
        g = pyvmm_guest_pool.get(settings)
    except Exception as e:
        tail = getattr(e, "console_tail", b"")
        if tail:
            request.node.stash[_console_key] = tail
        raise
    request.node.stash[_guest_key] = g
    return g


_guest_key = pytest.StashKey[object]()
_console_key = pytest.StashKey[bytes]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    g = item.stash.get(_guest_key, None)
    tail = g.console_tail(CONSOLE_TAIL) if g is not None else item.stash.get(_console_key, b"")
    if tail:
        report.sections.append(("pyvmm guest console (tail)", tail.decode(errors="replace")))
