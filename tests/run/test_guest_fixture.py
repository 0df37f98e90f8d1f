"""vmm.Guest through the pytest plugin's ``guest`` fixture (one boot for the module:
the fixture's default scope is ``module``, which the second test checks)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.linux, pytest.mark.timeout(900),
              pytest.mark.usefixtures("guest_build_prerequisites")]


def test_three_commands_in_one_guest(guest):
    r1 = guest.run("echo one; echo two >&2; echo state > /tmp/state; exit 3")
    assert (r1.exit_code, r1.stdout, r1.stderr) == (3, b"one\n", b"two\n")
    r2 = guest.run(["cat", "/tmp/state"])
    assert (r2.exit_code, r2.stdout) == (0, b"state\n")
    chunks = []
    r3 = guest.run("for i in 1 2 3; do echo line $i; done; uname -m",
                   env={"X": "1"}, workdir="/tmp", stdout=chunks.append)
    # A streamed stdout goes to the callback only (not kept: issue #14, bounded memory).
    assert b"".join(chunks) == b"line 1\nline 2\nline 3\nx86_64\n" and r3.stdout == b""
    console = guest.console
    if not guest.restored:     # a guest restored from the snapshot cache did not boot
        assert b"Linux version" in console and b"pyvmm: ready" in console
    assert b"line 1" not in console        # command output never reaches the console


def test_module_scope_shares_the_guest(guest):
    assert guest.run("cat /tmp/state").stdout == b"state\n"
    r = guest.run("kill -9 $$")
    assert (r.exit_code, r.signal) == (137, 9)
