"""The agent protocol without a VM: framing on the host, and the real agent binary
(guests/agent/agent.c, compiled here) driven over a pseudo-terminal, as on ttyS1."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import time

import pytest

from vmm import guest as G
from vmm.guestbuild import AGENT_SOURCE_PATH

AWKWARD_ARGS = ["a b", "q'uo\"te", "line\nbreak", "ünïcödé €", "", "\t", "$HOME", "*", "-n"]


def test_frame_parser_splits_frames_across_feeds():
    data = (G.HEADER.pack(G.T_STDOUT, 3) + b"abc" + G.HEADER.pack(G.T_EXIT, 5)
            + bytes([0, 7, 0, 0, 0]))
    p = G.FrameParser()
    got = []
    for i in range(len(data)):           # one byte at a time, as the UART delivers them
        got += p.feed(data[i:i + 1])
    assert got == [(G.T_STDOUT, b"abc"), (G.T_EXIT, bytes([0, 7, 0, 0, 0]))]
    assert G.decode_exit(got[1][1]) == (7, None)
    assert G.decode_exit(bytes([1, 9, 0, 0, 0])) == (137, 9)


def test_frame_parser_rejects_garbage_and_huge_frames():
    with pytest.raises(G.ProtocolError, match="unknown frame type"):
        G.FrameParser().feed(b"Z\0\0\0\0")
    with pytest.raises(G.ProtocolError, match="at most"):
        G.FrameParser().feed(G.HEADER.pack(G.T_STDOUT, G.MAX_PAYLOAD + 1))


def test_encode_run_layout_and_validation():
    frame = G.encode_run(["echo", "a b"], {"K": "v=1"}, "/tmp")
    ftype, length = G.HEADER.unpack_from(frame)
    assert ftype == G.T_RUN and length == len(frame) - G.HEADER.size
    assert frame[G.HEADER.size:] == b"\2\0\0\0\1\0\0\0/tmp\0echo\0a b\0K=v=1\0"
    for bad in (lambda: G.encode_run([]), lambda: G.encode_run(["a\0b"]),
                lambda: G.encode_run(["x"], {"A=B": "c"})):
        with pytest.raises(ValueError):
            bad()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    exe = tmp_path_factory.mktemp("agent") / "pyvmm-agent"
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-Werror", "-o", str(exe),
                    str(AGENT_SOURCE_PATH)], check=True)
    return exe


class PtyAgent:
    """The agent on a pty in raw mode: the same tty layer it meets on ttyS1."""

    def __init__(self, exe):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([str(exe), os.ttyname(slave)], stderr=subprocess.PIPE)
        self.parser = G.FrameParser()
        try:
            assert self.frames() == [(G.T_READY, G.PROTOCOL_VERSION)]
        finally:
            os.close(slave)   # only once the agent has it open (else reads give EIO)

    def frames(self, timeout=20.0) -> list[tuple[int, bytes]]:
        """Frames up to and including the next READY or EXIT."""
        import select
        got, deadline = [], time.monotonic() + timeout
        while True:
            assert select.select([self.master], [], [], max(0, deadline - time.monotonic()))[0]
            for f in self.parser.feed(os.read(self.master, 65536)):
                got.append(f)
                if f[0] in (G.T_READY, G.T_EXIT):
                    return got

    def run(self, argv, env=None, workdir=None) -> G.RunResult:
        os.write(self.master, G.encode_run(argv, env, workdir))
        frames = self.frames()
        out = b"".join(p for t, p in frames if t == G.T_STDOUT)
        err = b"".join(p for t, p in frames if t == G.T_STDERR)
        code, sig = G.decode_exit(frames[-1][1])
        return G.RunResult(code, out, err, sig)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()
        os.close(self.master)


def test_agent_over_a_pty(agent, tmp_path):
    a = PtyAgent(agent)
    try:
        r = a.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
        assert (r.exit_code, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
        r = a.run(["printf", "%s\\0", *AWKWARD_ARGS])
        assert r.stdout.split(b"\0")[:-1] == [x.encode() for x in AWKWARD_ARGS]
        r = a.run(["sh", "-c", 'pwd; echo "$FOO"'], env={"FOO": "x y"}, workdir=str(tmp_path))
        assert r.stdout == f"{tmp_path}\nx y\n".encode()
        r = a.run(["sh", "-c", "kill -9 $$"])
        assert (r.exit_code, r.signal) == (137, 9)
        r = a.run(["no-such-command-pyvmm"])
        assert r.exit_code == 127 and b"cannot run no-such-command-pyvmm" in r.stderr
        r = a.run(["true"], workdir="/no/such/dir")
        assert r.exit_code == 126 and b"cannot change directory" in r.stderr
        # A background process that keeps the pipes open does not hold up EXIT.
        t0 = time.monotonic()
        r = a.run(["sh", "-c", "sleep 30 & echo started"])
        assert r.stdout == b"started\n" and time.monotonic() - t0 < 10
        # Binary-safe and big: 300 kB of every byte value.
        r = a.run(["sh", "-c", "i=0; while [ $i -lt 1200 ]; do printf '%s' \"$0\"; "
                   "i=$((i+1)); done", bytes(range(1, 256)).decode("latin-1")])
        assert r.exit_code == 0 and len(r.stdout) > 100_000
    finally:
        a.close()
