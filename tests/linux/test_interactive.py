"""An interactive session on a pseudo-terminal: raw mode, the guest shell, the Ctrl-A
escapes, and the terminal settings restored afterwards."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.linux.conftest import BOOT_TIMEOUT_S, pyvmm_command

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.linux, pytest.mark.timeout(420)]

PROMPT_RE = r"\n[^\n]*[#$] (?:\x1b\[6n)?"
STTY_RE = re.compile(r"^([0-9a-f]+(?::[0-9a-f]+){10,})\r?$", re.M)


def test_interactive_shell_and_escapes(default_guest):
    pyvmm = " ".join(shlex.quote(a) for a in pyvmm_command())
    child = pexpect.spawn(
        "sh", ["-c", f"stty -g; {pyvmm} boot --timeout {BOOT_TIMEOUT_S}; "
                     f"echo pyvmm-status=$?; stty -g"],
        encoding="utf-8", codec_errors="replace", timeout=BOOT_TIMEOUT_S,
        dimensions=(40, 120))
    transcript = []
    child.logfile_read = _Collect(transcript)
    try:
        child.expect(STTY_RE, timeout=30)
        before_settings = child.match.group(1)
        # The shell's banner: printed by a booted guest after READY_MARKER, and by one
        # restored from the "shell ready" snapshot (vmm/cli/shellsnap.py) too.
        child.expect_exact("built-in shell")
        # The busybox shell prompt ("/ # "; ash's line editor may follow it with a
        # cursor-position query, ESC [6n); wait for it so input goes to the shell.
        child.expect(PROMPT_RE, timeout=120)

        child.send("echo $((6*7))\r")
        # The echo of the typed line contains "6*7"; the guest's answer is 42 alone
        # (leave its "\n" in the buffer: PROMPT_RE starts with one).
        child.expect(r"\r\n42\r(?=\n)", timeout=60)
        child.expect(PROMPT_RE, timeout=60)

        child.send("\x01h")   # Ctrl-A h: pyvmm's help, not sent to the guest
        child.expect_exact("Ctrl-A x", timeout=20)
        child.expect_exact("quit", timeout=5)

        child.send("\x01x")   # Ctrl-A x: stop the VM
        child.expect(r"pyvmm-status=(\d+)", timeout=30)
        status = int(child.match.group(1))
        child.expect(STTY_RE, timeout=10)
        after_settings = child.match.group(1)
        child.expect(pexpect.EOF, timeout=10)
    except (pexpect.TIMEOUT, pexpect.EOF) as e:
        pytest.fail(f"{type(e).__name__} waiting for output; transcript tail:\n"
                    + "".join(transcript)[-3000:])
    finally:
        child.close(force=True)
    assert status == 130, "".join(transcript)[-3000:]
    assert after_settings == before_settings, "pyvmm left the terminal in another mode"


class _Collect:
    """A file-like logfile for pexpect that keeps everything read."""

    def __init__(self, sink: list[str]):
        self.sink = sink

    def write(self, s: str) -> None:
        self.sink.append(s)

    def flush(self) -> None:
        pass
