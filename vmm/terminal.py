"""The user's terminal as the guest's serial console.

Output: guest bytes go to stdout as they come; pyvmm's own messages go to stderr and
start on a fresh line, so they never split a guest line in two.
Input: when stdin is a terminal it is put in raw mode (restored on every exit path:
normal exit, exceptions, SIGTERM) and Ctrl-A is an escape key: Ctrl-A x quits,
Ctrl-A h prints help, Ctrl-A Ctrl-A sends one Ctrl-A to the guest. When stdin is not a
terminal, its bytes are passed through unchanged and EOF is harmless.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable

ESCAPE = 0x01  # Ctrl-A
HELP = ("\r\npyvmm console escapes:\r\n"
        "  Ctrl-A x       quit (stops the VM)\r\n"
        "  Ctrl-A s       save a snapshot of the VM (it goes on running)\r\n"
        "  Ctrl-A h       this help\r\n"
        "  Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n")


class ConsoleOutput:
    """Writes guest output to a file descriptor and tracks whether a line is open."""

    def __init__(self, fd: int | None = None, log_path: str | None = None):
        self.fd = sys.stdout.fileno() if fd is None else fd
        self._lock = threading.Lock()
        self.mid_line = False
        self._log = None
        if log_path:
            from vmm.hostfiles import ConsoleLog
            self._log = ConsoleLog(log_path, self._log_failed)

    def write(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    select.select([], [self.fd], [], 1.0)
                    continue
                except OSError:   # stdout closed (e.g. a pipe reader went away): drop
                    break
                view = view[n:]
            if self._log is not None:
                self._log.write(data)
            if data:
                self.mid_line = not data.endswith(b"\n")

    def _log_failed(self, message: str) -> None:
        """The console log could not be written (vmm.hostfiles.ConsoleLog): one line on
        stderr, after the guest's open line (called with the lock held)."""
        if self.mid_line:
            try:
                os.write(self.fd, b"\r\n")
            except OSError:
                pass
            self.mid_line = False
        try:
            os.write(2, f"pyvmm: {message}\n".encode(errors="backslashreplace"))
        except OSError:
            pass

    def end_line(self) -> None:
        """Before a pyvmm message: finish the guest's open line, if any."""
        with self._lock:
            if self.mid_line:
                try:
                    os.write(self.fd, b"\r\n")
                except OSError:
                    pass
                self.mid_line = False

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class ConsoleInput:
    """Feeds stdin to the guest's UART on a thread, with the Ctrl-A escapes on a tty.

    Args:
        send: puts bytes into the UART's input FIFO, returning how many it took.
        space: how many bytes the FIFO can take now (input waits while it is full).
        on_quit: called for Ctrl-A x.
        on_help: called for Ctrl-A h with the help text.
        on_snapshot: called for Ctrl-A s (on this thread: it should hand the work to
            another one), or None when snapshots are not offered.
    """

    def __init__(self, send: Callable[[bytes], int], space: Callable[[], int],
                 on_quit: Callable[[], None], on_help: Callable[[str], None], fd: int | None = None,
                 on_snapshot: Callable[[], None] | None = None):
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.send, self.space, self.on_quit, self.on_help = send, space, on_quit, on_help
        self.on_snapshot = on_snapshot
        self.is_tty = os.isatty(self.fd)
        self._saved = None
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._escape = False
        self.thread = threading.Thread(target=self._run, name="console-input", daemon=True)

    def __enter__(self) -> "ConsoleInput":
        if self.is_tty:
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(2)
        self.restore()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def restore(self) -> None:
        """Put the terminal back as it was (idempotent; safe from signal handlers)."""
        if self._saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass
            self._saved = None

    def _translate(self, data: bytes) -> bytes:
        if not self.is_tty:
            return data
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    self.on_quit()
                    self._stop = True
                    break
                if b in (ord("s"), ord("S")) and self.on_snapshot is not None:
                    self.on_snapshot()
                elif b in (ord("h"), ord("H"), ord("?")):
                    self.on_help(HELP)
                elif b == ESCAPE:
                    out.append(ESCAPE)
                continue
            if b == ESCAPE:
                self._escape = True
                continue
            out.append(b)
        return bytes(out)

    def _deliver(self, data: bytes) -> None:
        while data and not self._stop:
            space = self.space()
            if space == 0:
                time.sleep(0.002)      # the guest has not drained the FIFO yet
                continue
            # Only what fits: a UART drops the rest and sets LSR OE (a spurious "input
            # overrun" in the guest, although the rest is sent again here).
            n = self.send(data[:space])
            data = data[n:]

    def _run(self) -> None:
        while not self._stop:
            try:
                ready, _, _ = select.select([self.fd, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in ready or self._stop:
                return
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:          # EOF: nothing more to send; the guest runs on
                return
            self._deliver(self._translate(data))
