"""A debug-exit port for test guests (QEMU ``isa-debug-exit`` style).

Claim one byte at port 0xF4 (``layout.DEBUG_EXIT_PORT``). A guest stops the VM by
writing a status byte there: ``outb(status, 0xf4)``. The device calls
``on_exit(status)`` with the byte itself -- unlike QEMU's isa-debug-exit, whose
process exit status is ``(value << 1) | 1``, so that a test guest can report 0
for success. Reads answer 0xff, like an empty ISA port. Wider writes use their
low byte.

The port keeps no state: :meth:`DebugExit.save` gives ``{"v": 1}`` and
:meth:`DebugExit.restore` only checks that (vmm/devices/state.py).
"""

from __future__ import annotations

from collections.abc import Callable

from vmm.devices.state import fields

__all__ = ["DebugExit"]

#: Length of the bus range to claim.
WINDOW_SIZE = 1


class DebugExit:
    """Args:
        on_exit: Called with the byte the guest wrote (0..255).
    """

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        """Always all-ones: the port is write-only."""
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        """Reports ``value & 0xff`` as the guest's exit status."""
        if offset == 0:
            self._on_exit(value & 0xFF)

    def save(self) -> dict:
        """Nothing but the version: the port keeps no state."""
        return {"v": 1}

    def restore(self, state: dict) -> None:
        """Check ``state`` (from :meth:`save`); raises DeviceStateError if it is not one."""
        fields(state, "debug-exit", ())
