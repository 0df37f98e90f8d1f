"""What the VMM does with each vCPU exit that reaches Python.

A vCPU loop (vmm/vcpu.py) decodes every exit once (vmm.kvm.exits) and hands the typed
value to :meth:`ExitHandler.handle`, which dispatches on its type through one table:
port and MMIO accesses go to the buses, shutdowns and system events end the VM, and an
instruction KVM could not emulate is either completed here (the host quirks of
vmm.cpuprofile: ``int3``, ``fwait``) or reported in one line naming the instruction.

The handler is given the buses and a few callables, never the Machine, so the machine
sits above it and the loops below neither.
"""

from __future__ import annotations

from collections.abc import Callable

from vmm.bus import Bus
from vmm.config import ExitReason
from vmm.cpuprofile import HostQuirks
from vmm.kvm import exits as X
from vmm.kvm import ioctls as K


class ExitHandler:
    """Handles the exits of every vCPU of one VM (called on the vCPU threads).

    Args:
        pio, mmio: the port-I/O and MMIO buses.
        quirks: the HostQuirks to complete refused instructions with.
        request_exit: ``request_exit(reason, *, status=None, detail="")`` ends the VM.
        guest_reset: called for a reset system event (the machine decides between
            reboot and panic).
        kernel_symbol: ``kernel_symbol(addr) -> str | None`` names a guest code address
            in the emulation-failure report.
    """

    def __init__(self, pio: Bus, mmio: Bus, quirks: HostQuirks, *,
                 request_exit: Callable[..., None], guest_reset: Callable[[], None],
                 kernel_symbol: Callable[[int], str | None]):
        self.pio = pio
        self.mmio = mmio
        self.quirks = quirks
        self.request_exit = request_exit
        self.guest_reset = guest_reset
        self.kernel_symbol = kernel_symbol
        #: How often each quirk completed an instruction (tests and diagnostics).
        self.quirk_counts = {"int3": 0, "fwait": 0}

    def handle(self, vcpu, ex) -> None:
        """Called on a vCPU thread for every exit that reaches Python."""
        self._handlers[type(ex)](self, vcpu, ex)

    # -- accesses: dispatched by bus ---------------------------------------------------
    def _io_out(self, vcpu, ex: X.IoOut) -> None:
        size, data = ex.size, ex.data
        for i in range(0, size * ex.count, size):     # string I/O: count items
            self.pio.write(ex.port, size, int.from_bytes(data[i:i + size], "little"))

    def _io_in(self, vcpu, ex: X.IoIn) -> None:
        size, read = ex.size, self.pio.read
        data = b"".join(read(ex.port, size).to_bytes(size, "little") for _ in range(ex.count))
        X.complete_io_in(vcpu.run_page, ex, data)

    def _mmio_write(self, vcpu, ex: X.MmioWrite) -> None:
        self.mmio.write(ex.addr, ex.size, ex.value)

    def _mmio_read(self, vcpu, ex: X.MmioRead) -> None:
        X.complete_mmio_read(vcpu.run_page, self.mmio.read(ex.addr, ex.size), ex.size)

    # -- the end of the VM ----------------------------------------------------------------
    def _shutdown(self, vcpu, ex) -> None:
        self.request_exit(ExitReason.TRIPLE_FAULT, detail=f"vCPU {vcpu.index}: triple fault")

    def _system_event(self, vcpu, ex: X.SystemEvent) -> None:
        if ex.type == K.KVM_SYSTEM_EVENT_RESET:
            self.guest_reset()
        elif ex.type == K.KVM_SYSTEM_EVENT_CRASH:
            self.request_exit(ExitReason.PANIC, detail="guest crash event")
        else:
            self.request_exit(ExitReason.POWEROFF)

    def _unexpected(self, vcpu, ex) -> None:
        self.request_exit(ExitReason.ERROR, detail=f"vCPU {vcpu.index}: unexpected exit {ex}")

    # -- instructions KVM could not emulate ---------------------------------------------
    def _internal_error(self, vcpu, ex: X.InternalError) -> None:
        if self._complete_quirk(vcpu, ex.insn):
            return
        regs = vcpu.get_regs()
        insn = ex.insn.hex(" ") if ex.insn else "unknown"
        where = f"RIP {regs.rip:#x}"
        name = self.kernel_symbol(regs.rip)
        if name:
            where += f" ({name})"
        self.request_exit(ExitReason.EMULATION_FAILURE,
                          detail=f"vCPU {vcpu.index}: KVM could not emulate the instruction at "
                                 f"{where} (bytes: {insn}; suberror {ex.suberror})")

    def _complete_quirk(self, vcpu, insn: bytes) -> bool:
        """Complete ``insn`` when a host quirk covers it; False when none does."""
        quirks = self.quirks
        if insn[:1] == b"\xcc" and quirks.complete_int3:
            # int3 is a trap: #BP is delivered with RIP after the instruction.
            regs = vcpu.get_regs()
            regs.rip += 1
            vcpu.set_regs(regs)
            events = vcpu.get_vcpu_events()
            events.exception.injected, events.exception.nr = 1, 3
            events.exception.has_error_code = 0
            events.flags = 0
            vcpu.set_vcpu_events(events)
            self.quirk_counts["int3"] += 1
            return True
        if insn[:1] == b"\x9b" and quirks.complete_fwait:
            regs = vcpu.get_regs()
            regs.rip += 1
            vcpu.set_regs(regs)
            self.quirk_counts["fwait"] += 1
            return True
        return False

    _handlers = {
        X.IoOut: _io_out, X.IoIn: _io_in, X.MmioWrite: _mmio_write, X.MmioRead: _mmio_read,
        X.Shutdown: _shutdown, X.SystemEvent: _system_event, X.InternalError: _internal_error,
        X.Hlt: _unexpected, X.FailEntry: _unexpected, X.Unknown: _unexpected,
        X.Interrupted: lambda self, vcpu, ex: None,
    }
