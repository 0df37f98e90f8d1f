"""The VMM's I/O thread: waits on ioeventfds and runs the device work they signal.

A guest's virtio QueueNotify write is registered with KVM as an ioeventfd, so it never
leaves the kernel as an MMIO exit: KVM bumps the eventfd and the vCPU goes on running.
This thread waits on all such eventfds and calls the handler for each (the transport's
``notify(queue)``), so disk I/O never runs on a vCPU thread.
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
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        self._fds: list[int] = []
        self._stop = False
        self.thread: threading.Thread | None = None
        self.on_error: Callable[[BaseException], None] = lambda e: None

    def add(self, handler: Callable[[], None]) -> int:
        """A new non-blocking eventfd whose signals call ``handler`` on this thread."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        self._sel.register(fd, selectors.EVENT_READ, handler)
        return fd

    def start(self) -> None:
        if self._fds and self.thread is None:
            self.thread = threading.Thread(target=self._run, name="io", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop:
                for key, _ in self._sel.select():
                    try:
                        os.eventfd_read(key.fd)
                    except BlockingIOError:
                        continue
                    if key.data is not None:
                        key.data()
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

    def close(self) -> None:
        self.stop()
        if self._wake < 0:
            return
        self._sel.close()
        for fd in (*self._fds, self._wake):
            os.close(fd)
        self._fds.clear()
        self._wake = -1
