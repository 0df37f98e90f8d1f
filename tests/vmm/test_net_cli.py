"""``--net`` / ``--publish`` as a user gives them: one-line errors with exit status 2 and
nothing left running; a VM with ``--net user`` ends with its passt gone."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import requires_kvm
from tests.unit.test_net import passt_pids, wait_gone
from tests.vmm.test_cli import assert_one_line_error, pyvmm

needs_passt = pytest.mark.skipif(not os.path.exists("/usr/bin/passt"), reason="no passt")


@pytest.mark.parametrize("args", [["--net", "bogus"], ["--net", "tap="],
                                  ["--publish", "80"], ["--publish", "8080:80"],
                                  ["--net", "user", "--publish", "x:1:2"],
                                  ["--net", "user", "--publish", "1:2/sctp"]])
def test_bad_net_options(tiny, args):
    assert_one_line_error(pyvmm("boot", "--raw", tiny("hello"), *args))


def test_run_checks_net_options_before_booting():
    assert_one_line_error(pyvmm("run", "--net", "user", "--publish", "99999:80", "--", "true"))


@needs_passt
@requires_kvm
def test_port_in_use(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = pyvmm("boot", "--raw", tiny("hello"), "--net", "user", "--publish",
                  f"127.0.0.1:{port}:80")
    assert_one_line_error(r)
    assert "in use" in r.stderr and not passt_pids(f"/{port}:80")


@requires_kvm
def test_passt_missing(tiny, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "vmm.cli", "boot", "--raw", str(tiny("hello")),
                        "--net", "user"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": str(tmp_path)}, stdin=subprocess.DEVNULL)
    assert_one_line_error(r)
    assert "passt" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@requires_kvm
def test_tap_that_cannot_be_opened(tiny):
    r = pyvmm("boot", "--raw", tiny("hello"), "--net", "tap=lo")
    assert_one_line_error(r)
    assert "tap=lo" in r.stderr


@needs_passt
@requires_kvm
def test_vm_with_user_net_runs_and_leaves_no_passt(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = pyvmm("boot", "--raw", tiny("hello", {"EXIT_STATUS": 7}), "--net", "user",
              "--publish", f"127.0.0.1:{port}:80")
    assert r.returncode == 7, r
    assert wait_gone(f"/{port}:80")
