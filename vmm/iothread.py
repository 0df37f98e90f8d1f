"""The VMM's I/O thread: waits on ioeventfds and backend fds and runs the device work.

A guest's virtio QueueNotify write is registered with KVM as an ioeventfd, so it never
leaves the kernel as an MMIO exit: KVM bumps the eventfd and the vCPU goes on running.
This thread waits on all such eventfds and calls the handler for each (the transport's
``notify(queue)``), so disk I/O never runs on a vCPU thread.

Besides the eventfds it makes itself (:meth:`IoThread.add`), it can wait on a fd a
device backend owns (:meth:`IoThread.add_reader`: a socket, a tap device): that is
readiness-based, the callback reads the fd itself, as with asyncio's ``add_reader``.
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable
from vmm.log import get_logger

log = get_logger("vmm.iothread")


class IoThread:
    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # Each key's data: (handler, owned): owned eventfds are drained before the
        # handler runs; a reader's fd belongs to its backend and is only watched.
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        self._fds: list[int] = []
        self._readers: set[int] = set()
        self._stop = False
        self.thread: threading.Thread | None = None
        self.on_error: Callable[[BaseException], None] = lambda e: None

    def add(self, handler: Callable[[], None]) -> int:
        """A new non-blocking eventfd whose signals call ``handler`` on this thread."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        self._sel.register(fd, selectors.EVENT_READ, (handler, True))
        return fd

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` on this thread whenever ``fd`` is readable.

        ``fd`` stays the caller's: this thread neither reads nor closes it, and the
        callback must consume what made it readable (or :meth:`remove_reader` it), else
        it is called again at once. May be called while the thread runs.
        """
        self._sel.register(fd, selectors.EVENT_READ, (callback, False))
        self._readers.add(fd)
        self._poke()

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (before its owner closes it)."""
        if fd in self._readers:
            self._readers.discard(fd)
            self._sel.unregister(fd)
            self._poke()

    def _poke(self) -> None:
        if self.thread is not None and self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    def start(self) -> None:
        """Start the thread (again, after stop(): a paused VM resumes)."""
        if (self._fds or self._readers) and self.thread is None and self._wake >= 0:
            self._stop = False
            self.thread = threading.Thread(target=self._run, name="io", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop:
                for key, _ in self._sel.select():
                    if key.data is None:         # the wake-up eventfd: re-check _stop
                        try:
                            os.eventfd_read(key.fd)
                        except BlockingIOError:
                            pass
                        continue
                    handler, owned = key.data
                    if owned:
                        try:
                            os.eventfd_read(key.fd)
                        except BlockingIOError:
                            continue
                    elif key.fd not in self._readers:
                        continue                 # removed since select() returned
                    handler()
        except BaseException as e:  # noqa: BLE001 - a device bug: end the VM, say why
            log.debug("I/O thread failed", exc_info=True)
            self.on_error(e)

    def stop(self) -> None:
        """Stop the thread after the handler in progress (idempotent)."""
        self._stop = True
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
            self.thread = None

    def close(self) -> None:
        self.stop()
        if self._wake < 0:
            return
        self._sel.close()
        for fd in (*self._fds, self._wake):
            os.close(fd)
        self._fds.clear()
        self._readers.clear()
        self._wake = -1
