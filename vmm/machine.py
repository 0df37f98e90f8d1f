"""Builds a running VM from a MachineConfig, in a fixed order, and runs it to its end.

Order: /dev/kvm -> VM -> KVM private areas -> in-kernel irqchip + PIT -> guest RAM ->
devices on the buses -> kernel (+ initrd, zero page) -> boot tables -> vCPUs.
Data flows one way: cli -> machine -> {kvm, memory, loader, devices} -> native.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from pathlib import Path
from collections.abc import Callable

from vmm import kvm as kvmlib
from vmm.arch.x86_64 import bootparams, cpu, cpuid, layout, mptable
from vmm.bus import Bus
from vmm.console import ConsoleWatcher
from vmm.devices.cmos import Cmos
from vmm.devices.debugexit import DebugExit
from vmm.devices.i8042 import I8042
from vmm.devices.serial8250 import Serial8250
from vmm.devices.testdev import TestDevice
from vmm.iothread import IoThread
from vmm.kvm import exits as X
from vmm.kvm import ioctls as K
from vmm.loader import SymbolTable, load_initrd, load_kernel
from vmm.memory import GuestMemory
from vmm.vcpu import VcpuLoop, default_loop, install_kick_handler, native
from vmm.log import get_logger

log = get_logger("vmm.machine")


class ExitReason(enum.Enum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    DEBUG_EXIT = "debug-exit"
    PANIC = "panic"
    TRIPLE_FAULT = "triple-fault"
    EMULATION_FAILURE = "emulation-failure"
    STOPPED = "stopped"
    ERROR = "error"


#: pyvmm's exit status for each way a VM can end (documented in the README).
#: A debug-exit ends with the byte the guest wrote instead.
EXIT_STATUS = {
    ExitReason.POWEROFF: 0,
    ExitReason.REBOOT: 0,
    ExitReason.ERROR: 1,
    ExitReason.PANIC: 3,
    ExitReason.TRIPLE_FAULT: 4,
    ExitReason.EMULATION_FAILURE: 5,
    ExitReason.STOPPED: 130,
}


#: How long the console thread lets guest output accumulate between drains (latency
#: bound for interactive output; see Machine._console_thread).
CONSOLE_BATCH_S = 0.01


# The records below are plain classes, not dataclasses: importing dataclasses costs ~8 ms
# of the VMM's start-up (issue #2 budgets 60 ms from exec to the first KVM_RUN).
class VmExit:
    """Why and how a VM ended: ``reason``, the exit ``status``, a one-line ``detail``."""

    __slots__ = ("reason", "status", "detail")

    def __init__(self, reason: ExitReason, status: int, detail: str = ""):
        self.reason = reason
        self.status = status
        self.detail = detail

    def __repr__(self) -> str:
        return f"VmExit(reason={self.reason!r}, status={self.status!r}, detail={self.detail!r})"


class HostQuirks:
    """Instructions an emulation-only host refuses that the VMM completes itself.

    ``complete_int3``: 0xCC in 64-bit mode: RIP += 1, inject #BP.
    ``complete_fwait``: 0x9B: RIP += 1 (no x87 exception can be pending).
    """

    __slots__ = ("complete_int3", "complete_fwait")

    def __init__(self, complete_int3: bool = False, complete_fwait: bool = False):
        self.complete_int3 = complete_int3
        self.complete_fwait = complete_fwait

    def __repr__(self) -> str:
        return (f"HostQuirks(complete_int3={self.complete_int3}, "
                f"complete_fwait={self.complete_fwait})")


class DiskConfig:
    """One virtio-blk disk (the CLI's ``--disk PATH[,ro][,snapshot][,serial=ID][,cache=MODE]``).

    ``snapshot``: writes go to a throwaway overlay; the image itself is never modified.
    """

    def __init__(self, path: Path, read_only: bool = False, serial: str | None = None,
                 cache: str = "writeback", snapshot: bool = False):
        self.path = path
        self.read_only = read_only
        self.serial = serial
        self.cache = cache
        self.snapshot = snapshot

    def __repr__(self) -> str:
        return (f"DiskConfig(path={self.path!r}, read_only={self.read_only}, "
                f"serial={self.serial!r}, cache={self.cache!r}, snapshot={self.snapshot})")


def _discard(data: bytes) -> None:
    pass


class MachineConfig:
    """What to build. Keyword arguments, all but ``kernel`` optional:

    kernel: the kernel or test-guest file.
    mem_size: guest RAM in bytes (default 256 MiB). cpus: vCPUs (default 1).
    kind: "raw" (a bare-metal ELF started in long mode with no boot protocol) or
        "linux" (the Linux x86 boot protocol: zero page, command line, initrd).
    initrd, cmdline: Linux only.
    kernel_mode: loader path for a bzImage: "auto", "elf" (decompress on the host) or
        "bzimage".
    loop: "shim" or "python" (default: vcpu.default_loop()).
    console: where guest serial output goes (called from the console thread).
    markers: console line prefixes to timestamp in Machine.times, {b"pyvmm: ready": "ready"}.
    quirks: HostQuirks. disks: a list of DiskConfig.
    system_map: System.map naming kernel functions in diagnostics (default: the ELF's
        own symbols, or a System.map beside the kernel file).
    serial2: where bytes the guest writes to the second UART (ttyS1) go; Linux guests
        only. Called on a vCPU thread. Host-to-guest bytes: Machine.serial2.enqueue_input.
    """

    def __init__(self, kernel: Path, *, mem_size: int = 256 << 20, cpus: int = 1,
                 kind: str = "raw", initrd: Path | None = None, cmdline: str = "",
                 kernel_mode: str = "auto", loop: str | None = None,
                 console: Callable[[bytes], None] = _discard,
                 markers: dict[bytes, str] | None = None, quirks: HostQuirks | None = None,
                 disks: list[DiskConfig] | None = None, system_map: Path | None = None,
                 serial2: Callable[[bytes], None] = _discard):
        self.kernel = kernel
        self.mem_size = mem_size
        self.cpus = cpus
        self.kind = kind
        self.initrd = initrd
        self.cmdline = cmdline
        self.kernel_mode = kernel_mode
        self.loop = loop if loop is not None else default_loop()
        self.console = console
        self.markers = markers if markers is not None else {}
        self.quirks = quirks if quirks is not None else HostQuirks()
        self.disks = disks if disks is not None else []
        self.system_map = system_map
        self.serial2 = serial2

    def __repr__(self) -> str:
        return (f"MachineConfig(kernel={self.kernel!r}, mem_size={self.mem_size}, "
                f"cpus={self.cpus}, kind={self.kind!r}, disks={self.disks!r})")


class Machine:
    """A VM built from ``config``; use as a context manager, then :meth:`run`."""

    def __init__(self, config: MachineConfig):
        self.config = config
        self.stopping = False
        self.result: VmExit | None = None
        self._result_lock = threading.Lock()
        self._closers: list[Callable[[], None]] = []
        self.loops: list[VcpuLoop] = []
        self.shim_serial = None
        self.quirk_counts = {"int3": 0, "fwait": 0}
        self.times: dict[str, float] = {"start": time.monotonic()}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction --------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        self.kvm = kvmlib.Kvm()
        self._closers.append(self.kvm.close)
        self.vm = self.kvm.create_vm()
        self._closers.append(self.vm.close)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()

        self.mem = GuestMemory(cfg.mem_size)
        self._closers.append(self.mem.close)
        self._mem_cdata = None
        host_base = self.mem_host_address = self._host_address(self.mem.host_buffer)
        self._closers.append(lambda: native().ffi.release(self._mem_cdata))
        for r in self.mem.regions:
            self.vm.set_user_memory_region(r.guest_addr, r.size, host_base + r.host_offset)

        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self._build_devices()
        self._load()
        self._build_vcpus()

    def _host_address(self, buf) -> int:
        shim = native()
        self._mem_cdata = shim.ffi.from_buffer(buf)
        return int(shim.ffi.cast("uintptr_t", self._mem_cdata))

    def _irq(self, gsi: int) -> Callable[[], None]:
        """An edge on ``gsi``: through an irqfd when KVM has them, else KVM_IRQ_LINE."""
        if self.kvm.check_extension(K.KVM_CAP_IRQFD):
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._closers.append(lambda: os.close(efd))
            self.vm.register_irqfd(efd, gsi)
            return lambda: os.eventfd_write(efd, 1)
        return lambda: self.vm.pulse_irq(gsi)

    def _build_devices(self) -> None:
        cfg = self.config
        # Serial output: in shim mode every byte (from C or from Python) goes through the
        # shim's ordered transmit buffer, drained by the console thread; in Python mode
        # the vCPU thread hands bytes straight to the console.
        self.console = ConsoleWatcher([self._first_output, cfg.console], self._console_event,
                                      cfg.markers)
        if cfg.loop == "shim":
            shim = native()
            self._tx_event = os.eventfd(0, os.EFD_CLOEXEC)
            self._closers.append(lambda: os.close(self._tx_event))
            self._txbuf = shim.ffi.gc(shim.lib.shim_tx_new(1 << 16, self._tx_event),
                                      shim.lib.shim_tx_free)
            self.shim_serial = shim.ffi.new("struct shim_serial *")
            self.shim_serial.base = layout.COM1_PORT
            self.shim_serial.tx = self._txbuf
            push, ffi = shim.lib.shim_tx_push, shim.ffi
            serial_out = lambda data: push(self._txbuf, ffi.from_buffer(data), len(data))  # noqa: E731
        else:
            serial_out = self.console.write
        self.serial = Serial8250(self._irq(layout.COM1_IRQ), serial_out)
        if self.shim_serial is not None:
            self.serial.on_state_change = self._sync_serial_fast_path
            self._sync_serial_fast_path()
        self.pio.insert(layout.COM1_PORT, 8, self.serial, "com1")
        if cfg.kind == "linux":
            self.serial2 = Serial8250(self._irq(layout.COM2_IRQ), cfg.serial2)
            self.pio.insert(layout.COM2_PORT, 8, self.serial2, "com2")
        self.pio.insert(layout.I8042_DATA_PORT, 5, I8042(self._guest_reset), "i8042")
        self.pio.insert(layout.CMOS_INDEX_PORT, 2, Cmos(), "cmos")
        self.pio.insert(layout.DEBUG_EXIT_PORT, 1, DebugExit(self._debug_exit), "debug-exit")
        if cfg.kind == "raw":
            self.testdev = TestDevice()
            self.mmio.insert(layout.TEST_MMIO_START, layout.TEST_MMIO_SIZE, self.testdev, "testdev")
        self._build_virtio()

    def _build_virtio(self) -> None:
        """virtio-mmio devices: one 4 KiB window and one IRQ each, announced to Linux on
        its command line; queue notifications arrive through ioeventfds on the I/O
        thread when KVM has them (else as MMIO writes on the vCPU thread)."""
        self.io = IoThread()
        self.io.on_error = self.fail
        self._closers.append(self.io.close)
        self.virtio_cmdline: list[str] = []
        self.disks = []
        if not self.config.disks:
            return
        # Imported here: a VM without disks (most test guests) starts faster without them.
        from vmm.devices.virtio.blk import VirtioBlk
        from vmm.devices.virtio.mmio import QUEUE_NOTIFY_OFFSET, VirtioMmioTransport, \
            kernel_cmdline_arg
        use_ioeventfd = bool(self.kvm.check_extension(K.KVM_CAP_IOEVENTFD))
        for i, disk in enumerate(self.config.disks):
            base = layout.VIRTIO_MMIO_START + i * layout.VIRTIO_MMIO_SIZE
            irq = layout.VIRTIO_IRQ_BASE + i
            blk = VirtioBlk(disk.path, read_only=disk.read_only, serial=disk.serial, cache=disk.cache,
                            snapshot=disk.snapshot)
            self._closers.append(blk.close)
            self.disks.append(blk)
            transport = VirtioMmioTransport(blk, self.mem, self._irq(irq))
            if use_ioeventfd:
                for q in range(len(blk.queue_max_sizes)):
                    fd = self.io.add(lambda q=q, t=transport: t.notify(q))
                    self.vm.register_ioeventfd(fd, base + QUEUE_NOTIFY_OFFSET, 4, datamatch=q)
            self.mmio.insert(base, layout.VIRTIO_MMIO_SIZE, transport, f"virtio-blk{i}")
            self.virtio_cmdline.append(kernel_cmdline_arg(base, irq))

    def _sync_serial_fast_path(self) -> None:
        tx_fast, lsr = self.serial.fast_path_state()
        self.shim_serial.tx_fast = int(tx_fast)
        self.shim_serial.lsr = lsr

    def _load(self) -> None:
        cfg = self.config
        self.kernel = load_kernel(self.mem, cfg.kernel, mode=cfg.kernel_mode)
        if cfg.kind == "linux":
            initrd = load_initrd(self.mem, cfg.initrd, kernel=self.kernel) if cfg.initrd else None
            cmdline = " ".join([cfg.cmdline, *self.virtio_cmdline]).strip()
            bootparams.build_zero_page(self.mem, setup_header=self.kernel.setup_header,
                                       cmdline=cmdline, initrd=initrd,
                                       e820=bootparams.e820_map(self.mem))
        cpu.write_boot_tables(self.mem)
        if cfg.cpus > 1:
            mptable.write_mptable(self.mem, cfg.cpus)

    def _build_vcpus(self) -> None:
        cfg = self.config
        install_kick_handler()
        supported = self.kvm.supported_cpuid()
        for i in range(cfg.cpus):
            vcpu = self.vm.create_vcpu(i)
            self._closers.append(vcpu.close)
            vcpu.set_cpuid(cpuid.vcpu_cpuid(supported, i, cfg.cpus))
            cpu.setup_msrs(vcpu)
            cpu.setup_lapic(vcpu)
            # vCPU 0 is the boot CPU; the others stay in KVM's wait-for-SIPI state until
            # the guest wakes them through its local APIC (INIT, SIPI).
            if i == 0:
                cpu.setup_long_mode(vcpu, self.kernel.entry, boot_params=self.boot_params_addr)
            loop = VcpuLoop(self, vcpu, cfg.loop)
            self._closers.append(loop.close)
            self.loops.append(loop)

    @property
    def boot_params_addr(self) -> int:
        return layout.ZERO_PAGE_START if self.config.kind == "linux" else 0

    # -- exits -----------------------------------------------------------------------------
    def handle_exit(self, vcpu, ex) -> None:
        """Called on a vCPU thread for every exit that reaches Python."""
        self._handlers[type(ex)](self, vcpu, ex)

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

    def _shutdown(self, vcpu, ex) -> None:
        self.request_exit(ExitReason.TRIPLE_FAULT, detail=f"vCPU {vcpu.index}: triple fault")

    def _system_event(self, vcpu, ex: X.SystemEvent) -> None:
        if ex.type == K.KVM_SYSTEM_EVENT_RESET:
            self._guest_reset()
        elif ex.type == K.KVM_SYSTEM_EVENT_CRASH:
            self.request_exit(ExitReason.PANIC, detail="guest crash event")
        else:
            self.request_exit(ExitReason.POWEROFF)

    def _internal_error(self, vcpu, ex: X.InternalError) -> None:
        regs = vcpu.get_regs()
        quirks = self.config.quirks
        if ex.insn[:1] == b"\xcc" and quirks.complete_int3:
            # int3 is a trap: #BP is delivered with RIP after the instruction.
            regs.rip += 1
            vcpu.set_regs(regs)
            events = vcpu.get_vcpu_events()
            events.exception.injected, events.exception.nr = 1, 3
            events.exception.has_error_code = 0
            events.flags = 0
            vcpu.set_vcpu_events(events)
            self.quirk_counts["int3"] += 1
            return
        if ex.insn[:1] == b"\x9b" and quirks.complete_fwait:
            regs.rip += 1
            vcpu.set_regs(regs)
            self.quirk_counts["fwait"] += 1
            return
        insn = ex.insn.hex(" ") if ex.insn else "unknown"
        where = f"RIP {regs.rip:#x}"
        name = self.kernel_symbol(regs.rip)
        if name:
            where += f" ({name})"
        self.request_exit(ExitReason.EMULATION_FAILURE,
                          detail=f"vCPU {vcpu.index}: KVM could not emulate the instruction at "
                                 f"{where} (bytes: {insn}; suberror {ex.suberror})")

    def kernel_symbol(self, addr: int) -> str | None:
        """``function+offset/size`` for a guest code address, when symbols are known."""
        if self.config.system_map is not None:
            symbols = SymbolTable.from_system_map(self.config.system_map)
        else:
            symbols = self.kernel.symbols
        return symbols.lookup(addr) if symbols else None

    def _unexpected(self, vcpu, ex) -> None:
        self.request_exit(ExitReason.ERROR, detail=f"vCPU {vcpu.index}: unexpected exit {ex}")

    _handlers = {
        X.IoOut: _io_out, X.IoIn: _io_in, X.MmioWrite: _mmio_write, X.MmioRead: _mmio_read,
        X.Shutdown: _shutdown, X.SystemEvent: _system_event, X.InternalError: _internal_error,
        X.Hlt: _unexpected, X.FailEntry: _unexpected, X.Unknown: _unexpected,
        X.Interrupted: lambda self, vcpu, ex: None,
    }

    # -- device callbacks --------------------------------------------------------------------
    def _debug_exit(self, value: int) -> None:
        self.request_exit(ExitReason.DEBUG_EXIT, status=value)

    def _guest_reset(self) -> None:
        if self.console.panicked:
            self.request_exit(ExitReason.PANIC, detail="guest kernel panic")
        else:
            self.request_exit(ExitReason.REBOOT)

    def _first_output(self, data: bytes) -> None:
        self.times.setdefault("first-output", time.monotonic())

    def _console_event(self, event: str) -> None:
        """Kernel events seen on the console (see vmm.console)."""
        if event == "poweroff":
            # Linux printed its last line before power-off; without ACPI nothing else
            # follows but init's death, so end the VM now.
            self.request_exit(ExitReason.POWEROFF)
        elif event == "panic-end":
            self.request_exit(ExitReason.PANIC, detail="guest kernel panic")
        elif event not in ("reboot", "panic"):
            self.times.setdefault(event, time.monotonic())

    # -- running and stopping -------------------------------------------------------------
    def request_exit(self, reason: ExitReason, *, status: int | None = None, detail: str = "") -> None:
        """End the VM (first caller wins) and stop every vCPU."""
        with self._result_lock:
            if self.result is None:
                self.result = VmExit(reason, EXIT_STATUS[reason] if status is None else status, detail)
                self.times["exit"] = time.monotonic()
            self.stopping = True
        for loop in self.loops:
            if loop.thread is not threading.current_thread():
                loop.kick()

    def fail(self, error: BaseException) -> None:
        self.request_exit(ExitReason.ERROR, detail=str(error) or type(error).__name__)

    def stop(self) -> None:
        """Stop the VM from another thread (Ctrl-A x, SIGTERM, a timeout)."""
        self.request_exit(ExitReason.STOPPED, detail="stopped by request")

    def run(self, timeout: float | None = None) -> VmExit:
        """Run every vCPU until the VM ends (or ``timeout`` seconds pass: STOPPED)."""
        console = None
        if self.config.loop == "shim":
            console = threading.Thread(target=self._console_thread, name="console", daemon=True)
            console.start()
        self.times["run"] = time.monotonic()
        self.io.start()
        for loop in self.loops:
            loop.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for loop in self.loops:
                while loop.thread.is_alive():
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self.request_exit(ExitReason.STOPPED, detail=f"timed out after {timeout} s")
                        deadline = None
                        continue
                    loop.thread.join(0.2 if left is None else min(left, 0.2))
        finally:
            self.stop()
            for loop in self.loops:
                loop.thread.join()
            self.io.stop()
            if console is not None:
                native().lib.shim_tx_close(self._txbuf)
                os.eventfd_write(self._tx_event, 1)
                console.join()
        return self.result

    def _console_thread(self) -> None:
        """Moves guest serial output from the shim's buffer to the console, in order.

        After each drain it sleeps CONSOLE_BATCH_S so that a guest printing in a tight
        loop wakes this thread once per batch rather than once per byte (each wake-up
        costs the vCPU an eventfd write and, on a small host, a context switch).
        """
        shim = native()
        buf = shim.ffi.new("uint8_t[]", 1 << 16)
        take, out = shim.lib.shim_tx_take, self.console.write

        def drain() -> None:
            while n := take(self._txbuf, buf, 1 << 16):
                out(bytes(shim.ffi.buffer(buf, n)))

        while True:
            os.eventfd_read(self._tx_event)
            drain()
            if self.stopping and all(not loop.thread.is_alive() for loop in self.loops):
                drain()
                return
            time.sleep(CONSOLE_BATCH_S)

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:  # noqa: BLE001 - best effort during teardown
                log.debug("teardown step failed", exc_info=True)
        self._closers.clear()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
