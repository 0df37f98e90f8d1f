"""The guest console on the host side: output fan-out, event watching, input.

``ConsoleWatcher`` recognises the kernel's own last words on the serial console,
which is how pyvmm tells a power-off from a reboot from a panic on a microVM without
ACPI: Linux prints "reboot: Power down" / "reboot: System halted" (a power-off
request becomes a halt when the kernel has no power-off method) / "reboot: Restarting
system" before it stops, and "Kernel panic - not syncing" when it panics
(kernel/reboot.c, kernel/panic.c). Lines are assembled with a bounded buffer, so a guest printing
without newlines cannot grow it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

POWER_DOWN = b"reboot: Power down"
HALTED = b"reboot: System halted"
RESTART = b"reboot: Restarting system"
PANIC = b"Kernel panic - not syncing"
PANIC_END = b"---[ end Kernel panic"

#: Longest line kept for matching; longer lines are matched on their first bytes.
MAX_LINE = 512


class ConsoleWatcher:
    """Feeds guest output to ``sinks`` and reports kernel events to ``on_event``.

    Args:
        sinks: callables taking bytes (the terminal, a log file, a test's buffer).
        on_event: called with "poweroff", "reboot", "panic" or "panic-end".
        markers: extra {bytes: event} line prefixes to report (e.g. a ready marker).
    """

    def __init__(self, sinks: list[Callable[[bytes], None]],
                 on_event: Callable[[str], None] = lambda event: None,
                 markers: dict[bytes, str] | None = None):
        self.sinks = sinks
        self.on_event = on_event
        # First match wins: the panic's closing line also contains PANIC.
        self.markers = {PANIC_END: "panic-end", PANIC: "panic", POWER_DOWN: "poweroff",
                        HALTED: "poweroff", RESTART: "reboot", **(markers or {})}
        self._line = bytearray()
        self._lock = threading.Lock()   # serialises writers (console thread, vCPU threads)
        self.tail = bytearray()         # the last bytes of output, for error reports
        self.panicked = False

    def write(self, data: bytes) -> None:
        with self._lock:
            for sink in self.sinks:
                sink(data)
            self.tail += data
            del self.tail[:-4096]
            for line in self._lines(data):
                for marker, event in self.markers.items():
                    if marker in line:
                        if event == "panic":
                            self.panicked = True
                        self.on_event(event)
                        break

    def _lines(self, data: bytes):
        while data:
            nl = data.find(b"\n")
            if nl < 0:
                room = MAX_LINE - len(self._line)
                self._line += data[:max(room, 0)]
                return
            self._line += data[:nl][:max(MAX_LINE - len(self._line), 0)]
            yield bytes(self._line)
            self._line.clear()
            data = data[nl + 1:]
