"""Opening the files a user names (kernel, initrd, console log) without blocking.

``open()`` of a FIFO blocks until the other end opens it — forever, with SIGTERM
handled by Python only after the call returns — and a FIFO or socket as a console log
blocks every write (and with it the guest's vCPU). So each file is opened with
O_NONBLOCK, checked with fstat on the descriptor (not a stat of the path before: the
path could be swapped between the two), and refused with one line if it is not what
pyvmm can use. O_NONBLOCK changes nothing for regular files and character devices.
"""

from __future__ import annotations

import errno
import os
import stat

from vmm.errors import UserError


class HostFileError(UserError):
    """A file the user named is not one pyvmm can use (one line, exit status 2)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISCHR, "a character device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, what: str):
    """Open ``path`` for reading (a binary file object) if it is a regular file.

    Raises:
        HostFileError: it is a FIFO, socket, device or directory (``"<what> <path>:
            ..."``).
        OSError: it cannot be opened (missing, permission denied).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise HostFileError(f"{what} {path}: is {_kind(mode)}; give a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_log(path, what: str = "--console-log"):
    """Open ``path`` for appending (unbuffered, binary): a regular file, or a character
    device such as /dev/null or a terminal; FIFOs and sockets are refused (a reader
    that stops reading would stall the guest).

    Raises:
        HostFileError: a FIFO, socket, directory or block device; or it cannot be
            opened (the message says why).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o666)
    except OSError as e:
        # ENXIO: a FIFO nobody reads (open O_WRONLY|O_NONBLOCK, fifo(7)).
        why = "is a FIFO; give a regular file" if e.errno == errno.ENXIO else e.strerror
        raise HostFileError(f"{what} {path}: {why}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            raise HostFileError(f"{what} {path}: is {_kind(mode)}; give a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "ab", buffering=0)
    except BaseException:
        os.close(fd)
        raise


class ConsoleLog:
    """The ``--console-log`` file, written from the console thread.

    A write that fails (a full file system: ENOSPC; EIO; EFBIG) must not end that
    thread — it is what drains the guest's output buffer; with it gone every later
    guest byte would wait for room. So the first failure is reported once, through
    ``report``, as one line, the log is closed, and the guest's output goes on to its
    other sinks.

    Args:
        path: the file (see open_log).
        report: called once with a one-line message if writing fails.
    """

    def __init__(self, path, report):
        self.path = path
        self._report = report
        self._file = open_log(path)

    def write(self, data: bytes) -> None:
        f = self._file
        if f is None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[f.write(view):]
        except OSError as e:
            self._file = None
            try:
                f.close()
            except OSError:
                pass
            self._report(f"--console-log {self.path}: {e.strerror or e}; "
                         "no longer writing the console log")

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
