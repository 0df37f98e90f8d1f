"""Builds a running VM from a MachineConfig, in a fixed order, and runs it to its end.

Order: /dev/kvm -> VM -> KVM private areas -> in-kernel irqchip + PIT -> guest RAM ->
devices on the buses -> kernel (+ initrd, zero page) -> boot tables -> vCPUs.
Data flows one way: cli -> machine -> {kvm, memory, loader, devices} -> native.

The records (MachineConfig, DiskConfig, VmExit, ExitReason, EXIT_STATUS) live in
vmm.config, HostQuirks beside the CPU profiles in vmm.cpuprofile, exit handling in
vmm.exithandler; the names are re-exported here for code that imports them from here.
"""

from __future__ import annotations

import os
import threading
import time
from collections import namedtuple
from collections.abc import Callable

from vmm import kvm as kvmlib
from vmm.arch.x86_64 import cpu, cpuid, layout
from vmm.bus import Bus
from vmm.config import EXIT_STATUS, DiskConfig, ExitReason, MachineConfig, VmExit
from vmm.console import ConsoleWatcher
from vmm.cpuprofile import HostQuirks
from vmm.devices import cmos, debugexit, i8042, serial8250
from vmm.devices.testdev import TestDevice
from vmm.errors import UserError
from vmm.exithandler import ExitHandler
from vmm.iothread import IoThread
from vmm.kvm import ioctls as K
from vmm.memory import GuestMemory
from vmm.vcpu import VcpuLoop, install_kick_handler, native
from vmm.log import get_logger

__all__ = ["Machine", "MachineError", "VirtioSlot", "CONSOLE_BATCH_S",
           # re-exported from vmm.config and vmm.cpuprofile
           "MachineConfig", "DiskConfig", "VmExit", "ExitReason", "EXIT_STATUS", "HostQuirks"]

log = get_logger("vmm.machine")


#: How long the console thread lets guest output accumulate between drains (latency
#: bound for interactive output; see Machine._console_thread).
CONSOLE_BATCH_S = 0.01


class MachineError(UserError):
    """The VM cannot be built as configured (e.g. more virtio devices than IRQs)."""


#: One attached virtio-mmio device: its bus ``name``, the device model, its transport,
#: the window's guest physical ``base`` and its ``irq``.
VirtioSlot = namedtuple("VirtioSlot", "name device transport base irq")

#: Notes already logged in this process (a test suite builds many machines).
_reported: set[str] = set()


class Machine:
    """A VM built from ``config``; use as a context manager, then :meth:`run`."""

    def __init__(self, config: MachineConfig, snapshot=None):
        """Build the hardware, then boot ``config.kernel`` — or, with ``snapshot`` (a
        vmm.snapshot.Snapshot, already read and checked), restore it instead (memory
        mapped from its file, every device and vCPU put back in its saved state).
        Firecracker's build_microvm_for_boot / build_microvm_from_snapshot, over the
        same hardware-creation steps."""
        self.config = config
        self.restored_from = snapshot
        self.stopping = False
        #: Set by pause(): the vCPU loops return, the VM does not end.
        self._pausing = False
        self.paused = False
        self._started = False
        self._ended = threading.Event()
        self._pause_lock = threading.Lock()
        #: Stateful devices by name, in creation order (snapshots save them by name).
        self.devices: dict[str, object] = {}
        #: Console watches: event name -> callback (watch_console).
        self._watches: dict[str, Callable[[], None]] = {}
        self.result: VmExit | None = None
        self._result_lock = threading.Lock()
        self._closers: list[Callable[[], None]] = []
        self.loops: list[VcpuLoop] = []
        self.shim_serial = None
        #: One-line notes worth telling the user once (e.g. KVM capabilities this host
        #: lacks), for the CLI to show with its own notes; also logged (INFO) once.
        self.notes: list[str] = []
        self._kernel_loaded = False
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
        self._report_missing_caps()
        self.vm = self.kvm.create_vm()
        self._closers.append(self.vm.close)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()

        if self.restored_from is None:
            self.mem = GuestMemory(cfg.mem_size)
        else:   # copy-on-write: nothing read up front, the file is never written
            self.mem = GuestMemory.from_file(self.restored_from.memory_path, cfg.mem_size)
        self._closers.append(self.mem.close)
        self._mem_cdata = None
        host_base = self.mem_host_address = self._host_address(self.mem.host_buffer)
        self._closers.append(lambda: native().ffi.release(self._mem_cdata))
        for r in self.mem.regions:
            self.vm.set_user_memory_region(r.guest_addr, r.size, host_base + r.host_offset)

        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.exit_handler = ExitHandler(self.pio, self.mmio, cfg.quirks,
                                        request_exit=self.request_exit,
                                        guest_reset=self._guest_reset,
                                        kernel_symbol=self.kernel_symbol)
        #: Called on a vCPU thread for every exit that reaches Python.
        self.handle_exit = self.exit_handler.handle
        self._build_devices()
        if self.restored_from is None:
            self._load()
        self._create_vcpus()
        if self.restored_from is None:
            self._boot_vcpus()
        else:
            from vmm.snapshot import persist
            persist.restore_state(self, self.restored_from)

    def _report_missing_caps(self) -> None:
        """Say once that optional KVM capabilities are missing (quiet when none are)."""
        missing = self.kvm.missing_optional
        if not missing:
            return
        note = (f"note: this host's KVM lacks optional capabilities ({'; '.join(missing)}); "
                "pyvmm runs without them, more slowly")
        self.notes.append(note)
        if note not in _reported:
            _reported.add(note)
            log.info("%s", note)

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
        self.serial = serial8250.Serial8250(self._irq(layout.COM1_IRQ), serial_out)
        if self.shim_serial is not None:
            self.serial.on_state_change = self._sync_serial_fast_path
            self._sync_serial_fast_path()
        self._add_device(self.pio, layout.COM1_PORT, serial8250.WINDOW_SIZE, self.serial, "com1")
        if cfg.kind == "linux":
            self.serial2 = serial8250.Serial8250(self._irq(layout.COM2_IRQ), cfg.serial2)
            self._add_device(self.pio, layout.COM2_PORT, serial8250.WINDOW_SIZE, self.serial2,
                             "com2")
        self._add_device(self.pio, layout.I8042_DATA_PORT, i8042.WINDOW_SIZE,
                         i8042.I8042(self._guest_reset), "i8042")
        self._add_device(self.pio, layout.CMOS_INDEX_PORT, cmos.WINDOW_SIZE, cmos.Cmos(), "cmos")
        self._add_device(self.pio, layout.DEBUG_EXIT_PORT, debugexit.WINDOW_SIZE,
                         debugexit.DebugExit(self._debug_exit), "debug-exit")
        if cfg.kind == "raw":
            self.testdev = TestDevice()
            self._add_device(self.mmio, layout.TEST_MMIO_START, layout.TEST_MMIO_SIZE,
                             self.testdev, "testdev")
        self._build_virtio()

    def _add_device(self, bus: Bus, base: int, size: int, device, name: str) -> None:
        """Put ``device`` on ``bus`` and in the registry snapshots are saved from."""
        bus.insert(base, size, device, name)
        self.devices[name] = device

    def _build_virtio(self) -> None:
        """The I/O thread, then one virtio-blk device per configured disk."""
        self.io = IoThread()
        self.io.on_error = self.fail
        self._closers.append(self.io.close)
        self.virtio: list[VirtioSlot] = []
        self.virtio_cmdline: list[str] = []
        self.disks = []
        #: The virtio-net card (vmm.devices.virtio.net.VirtioNet), or None.
        self.nic = None
        if self.config.disks:
            self._build_disks()
        if self.config.net is not None:
            self._build_nic(self.config.net)

    def _build_disks(self) -> None:
        # Imported here: a VM without disks (most test guests) starts faster without it.
        from vmm.devices.virtio.blk import VirtioBlk
        for i, disk in enumerate(self.config.disks):
            saved = None
            if disk.snapshot and self.restored_from is not None:
                # The copy-on-write overlay belongs to the snapshot: a private copy of it.
                from vmm.snapshot.persist import disk_file
                saved = self.restored_from.path(disk_file(len(self.virtio)))
            blk = VirtioBlk(disk.path, read_only=disk.read_only, serial=disk.serial, cache=disk.cache,
                            snapshot=disk.snapshot, overlay_file=saved, inserted=disk.inserted)
            self.attach_virtio(blk, f"virtio-blk{i}")
            self.disks.append(blk)

    def insert_disk(self, index: int, disk: DiskConfig, backend=None) -> None:
        """Put ``disk`` into empty drive ``index`` (``DiskConfig.empty()`` in the
        config) of a running or paused VM; the guest is told with a configuration
        change interrupt and sees the new capacity (Linux: /sys/block/vdX/size).
        ``backend``: the disk already opened (vmm.disk.open_disk with ``disk``'s
        options), which the machine then owns.

        Raises:
            MachineError: no such drive, or it is not empty.
            BlockError: the disk cannot be opened (the drive stays empty).
        """
        if not 0 <= index < len(self.disks) or not self.disks[index].empty:
            raise MachineError(f"drive {index} is not an empty drive of this VM")
        if disk.path is None:
            raise MachineError("insert_disk needs a disk with a path")
        blk = self.disks[index]
        slot = next(s for s in self.virtio if s.device is blk)
        slot.transport.change_device(lambda: blk.insert(
            disk.path if backend is None else backend, read_only=disk.read_only,
            serial=disk.serial, cache=disk.cache, snapshot=disk.snapshot))
        self.config.disks[index] = DiskConfig(disk.path, read_only=disk.read_only,
                                              serial=disk.serial, cache=disk.cache,
                                              snapshot=disk.snapshot, inserted=True)

    def _build_nic(self, net) -> None:
        """The virtio-net card of ``net`` (a vmm.config.NetConfig) and its backend,
        whose fd the I/O thread serves (vmm.net)."""
        from vmm.net import open_backend
        backend = open_backend(net)
        self.attach_nic(backend, net.mac)
        if backend.guest_cmdline:  # e.g. pyvmm.net=... for the default guest's /init
            self.virtio_cmdline.append(backend.guest_cmdline)

    def attach_nic(self, backend, mac: bytes, name: str = "virtio-net0"):
        """A virtio-net card in front of ``backend`` (a vmm.net.base.NetBackend, which
        the machine then owns) through :meth:`attach_virtio`; the I/O thread serves the
        backend's fd. Returns the VirtioNet (also ``self.nic``)."""
        from vmm.devices.virtio.net import RX_QUEUE, VirtioNet
        try:
            nic = VirtioNet(backend, mac)
        except BaseException:
            backend.close()
            raise
        slot = self.attach_virtio(nic, name)
        nic.request_rx = lambda t=slot.transport: t.notify(RX_QUEUE)
        self.nic = nic
        fd = backend.fileno()
        if fd < 0:
            return nic

        def readable() -> None:
            nic.on_readable()
            if nic.backend_gone:  # EOF stays readable: stop watching it
                self.io.remove_reader(fd)

        self.io.add_reader(fd, readable)
        self._closers.append(lambda: self.io.remove_reader(fd))
        return nic

    def attach_virtio(self, device, name: str) -> VirtioSlot:
        """Put a virtio device model on the MMIO bus behind a virtio-mmio transport.

        Device ``i`` (in attach order) gets the 4 KiB window at ``VIRTIO_MMIO_START +
        i * VIRTIO_MMIO_SIZE`` and IRQ ``VIRTIO_IRQ_BASE + i`` (vmm/arch/x86_64/layout.py),
        is announced on the Linux command line, and has its queue notifications arrive
        as ioeventfds on the I/O thread when KVM has them (else as MMIO writes on the
        vCPU thread). The machine owns ``device`` from here on: its ``close()``, if it
        has one, runs at teardown. A device whose backend has its own fd (a socket)
        waits on it with ``machine.io.add_reader(fd, callback)``.

        Args:
            device: a virtio device model (vmm.devices.virtio.mmio.VirtioDevice).
            name: its name on the bus, in diagnostics ("virtio-blk0").
        Returns:
            the VirtioSlot: name, device, transport, base, irq.
        Raises:
            MachineError: every window/IRQ is taken (layout.VIRTIO_MAX_DEVICES).
        """
        close = getattr(device, "close", None)
        if close is not None:
            self._closers.append(close)
        index = len(self.virtio)
        if index >= layout.VIRTIO_MAX_DEVICES:
            raise MachineError(f"cannot attach {name}: a VM has at most "
                               f"{layout.VIRTIO_MAX_DEVICES} virtio devices")
        if self._kernel_loaded and self.config.kind == "linux":
            raise RuntimeError(f"{name} attached after the kernel command line was written")
        from vmm.devices.virtio.mmio import QUEUE_NOTIFY_OFFSET, VirtioMmioTransport, \
            kernel_cmdline_arg
        base = layout.VIRTIO_MMIO_START + index * layout.VIRTIO_MMIO_SIZE
        irq = layout.VIRTIO_IRQ_BASE + index
        transport = VirtioMmioTransport(device, self.mem, self._irq(irq))
        if self.kvm.check_extension(K.KVM_CAP_IOEVENTFD):
            for q in range(len(device.queue_max_sizes)):
                fd = self.io.add(lambda q=q, t=transport: t.notify(q))
                self.vm.register_ioeventfd(fd, base + QUEUE_NOTIFY_OFFSET, 4, datamatch=q)
        self.mmio.insert(base, layout.VIRTIO_MMIO_SIZE, transport, name)
        slot = VirtioSlot(name, device, transport, base, irq)
        self.virtio.append(slot)
        self.virtio_cmdline.append(kernel_cmdline_arg(base, irq, layout.VIRTIO_MMIO_SIZE))
        return slot

    def _sync_serial_fast_path(self) -> None:
        tx_fast, lsr = self.serial.fast_path_state()
        self.shim_serial.tx_fast = int(tx_fast)
        self.shim_serial.lsr = lsr

    def _load(self) -> None:
        # Imported here: a restored VM loads no kernel (and starts faster without them).
        from vmm.arch.x86_64 import bootparams, mptable
        from vmm.loader import load_initrd, load_kernel
        cfg = self.config
        self.kernel = load_kernel(self.mem, cfg.kernel, mode=cfg.kernel_mode)
        if cfg.kind == "linux":
            initrd = load_initrd(self.mem, cfg.initrd, kernel=self.kernel) if cfg.initrd else None
            cmdline = " ".join([cfg.cmdline, *self.virtio_cmdline]).strip()
            bootparams.build_zero_page(self.mem, setup_header=self.kernel.setup_header,
                                       cmdline=cmdline, initrd=initrd,
                                       e820=bootparams.e820_map(self.mem))
        self._kernel_loaded = True
        cpu.write_boot_tables(self.mem)
        if cfg.cpus > 1:
            mptable.write_mptable(self.mem, cfg.cpus)

    def _create_vcpus(self) -> None:
        """Create every vCPU with its CPUID table and its run loop (no CPU state yet)."""
        cfg = self.config
        install_kick_handler()
        supported = self.kvm.supported_cpuid()
        #: The CPUID table of vCPU 0, as given to KVM (a snapshot depends on it).
        self.cpuid_table = None
        for i in range(cfg.cpus):
            vcpu = self.vm.create_vcpu(i)
            self._closers.append(vcpu.close)
            table = cpuid.vcpu_cpuid(supported, i, cfg.cpus)
            if i == 0:
                self.cpuid_table = table
            vcpu.set_cpuid(table)
            loop = VcpuLoop(vcpu, cfg.loop, handle_exit=self.handle_exit,
                            stopping=self._loops_should_return, fail=self.fail,
                            shim_serial=self.shim_serial)
            self._closers.append(loop.close)
            self.loops.append(loop)

    def _boot_vcpus(self) -> None:
        """The boot CPU state: MSRs and LAPIC on every vCPU, long mode at the kernel's
        entry on vCPU 0; the others stay in KVM's wait-for-SIPI state until the guest
        wakes them through its local APIC (INIT, SIPI)."""
        for i, loop in enumerate(self.loops):
            cpu.setup_msrs(loop.vcpu)
            cpu.setup_lapic(loop.vcpu)
            if i == 0:
                cpu.setup_long_mode(loop.vcpu, self.kernel.entry,
                                    boot_params=self.boot_params_addr)

    def _loops_should_return(self) -> bool:
        return self.stopping or self._pausing

    @property
    def boot_params_addr(self) -> int:
        return layout.ZERO_PAGE_START if self.config.kind == "linux" else 0

    # -- exits (vmm.exithandler) --------------------------------------------------------
    @property
    def quirk_counts(self) -> dict[str, int]:
        """How often each host quirk completed an instruction."""
        return self.exit_handler.quirk_counts

    def kernel_symbol(self, addr: int) -> str | None:
        """``function+offset/size`` for a guest code address, when symbols are known."""
        if self.config.system_map is not None:
            from vmm.loader import SymbolTable
            symbols = SymbolTable.from_system_map(self.config.system_map)
        elif getattr(self, "kernel", None) is not None:
            symbols = self.kernel.symbols
        else:   # restored from a snapshot: no kernel file was loaded
            symbols = None
        return symbols.lookup(addr) if symbols else None

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
        elif event in self._watches:
            self._watches.pop(event)()
        elif event not in ("reboot", "panic"):
            self.times.setdefault(event, time.monotonic())

    def watch_console(self, text: bytes, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, the first time a console line contains ``text``.
        It runs on the thread that writes console output (the console thread, or a
        vCPU thread with the Python loop): it must not wait for the VM (e.g. pause it)
        itself, only start whatever does."""
        event = f"watch-{len(self._watches)}-{len(self.console.markers)}"
        self._watches[event] = callback
        self.console.markers[bytes(text)] = event

    # -- running and stopping -------------------------------------------------------------
    def request_exit(self, reason: ExitReason, *, status: int | None = None, detail: str = "") -> None:
        """End the VM (first caller wins) and stop every vCPU."""
        with self._result_lock:
            if self.result is None:
                self.result = VmExit(reason, EXIT_STATUS[reason] if status is None else status, detail)
                self.times["exit"] = time.monotonic()
            self.stopping = True
            self._ended.set()
        for loop in self.loops:
            if loop.thread is not threading.current_thread():
                loop.kick()

    def fail(self, error: BaseException) -> None:
        self.request_exit(ExitReason.ERROR, detail=str(error) or type(error).__name__)

    def stop(self) -> None:
        """Stop the VM from another thread (Ctrl-A x, SIGTERM, a timeout)."""
        self.request_exit(ExitReason.STOPPED, detail="stopped by request")

    def run(self, timeout: float | None = None) -> VmExit:
        """Run every vCPU until the VM ends (or ``timeout`` seconds pass: STOPPED).

        The VM may be paused and resumed (pause(), resume(), snapshot()) from other
        threads meanwhile; run() returns only when it has ended."""
        console = None
        if self.config.loop == "shim":
            console = threading.Thread(target=self._console_thread, name="console", daemon=True)
            console.start()
        self.times["run"] = time.monotonic()
        # Under the pause lock: a pause() asked for as soon as the first vCPU runs (by
        # a console watch on its first line) waits until every vCPU thread is started.
        with self._pause_lock:
            self._started = True
            if self.restored_from is not None:
                from vmm.snapshot import persist
                persist.after_restore(self)
            self.io.start()
            for loop in self.loops:
                loop.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.request_exit(ExitReason.STOPPED, detail=f"timed out after {timeout} s")
                    deadline = None
                if self._ended.wait(0.2 if left is None else max(0.0, min(left, 0.2))):
                    break
        finally:
            self.stop()
            with self._pause_lock:        # a pause in progress finishes first
                pass
            for loop in self.loops:
                if loop.thread is not None:
                    loop.thread.join()
            self.io.stop()
            if console is not None:
                native().lib.shim_tx_close(self._txbuf)
                os.eventfd_write(self._tx_event, 1)
                console.join()
        return self.result

    # -- pause, resume, snapshot ----------------------------------------------------------
    def pause(self) -> bool:
        """Stop every vCPU and the I/O thread with nothing half done; returns False if
        the VM ended first (then nothing is paused).

        The vCPU loops are asked to return (immediate_exit + a kick), joined, and each
        vCPU makes one more KVM_RUN with immediate_exit set, which completes port or
        MMIO I/O the last exit left pending (its result is in the kvm_run page until
        then); the I/O thread finishes the request in hand and stops, so no virtio
        request is half processed. Call from any thread but a vCPU or the I/O thread.
        """
        with self._pause_lock:
            if self.paused:
                return True
            if self.stopping or not getattr(self, "_started", False):
                return False
            self._pausing = True
            for loop in self.loops:
                loop.kick()
            for loop in self.loops:
                if loop.thread is not None:
                    loop.thread.join()
            if self.stopping:
                self._pausing = False
                return False
            for loop in self.loops:
                loop.vcpu.complete_pending_io()
            self.io.stop()
            self.paused = True
            self.times["paused"] = time.monotonic()
            return True

    def resume(self) -> None:
        """Start the vCPUs and the I/O thread again after pause()."""
        with self._pause_lock:
            if not self.paused:
                return
            self.paused = False
            self._pausing = False
            if self.stopping:
                return
            self.io.start()
            for loop in self.loops:
                loop.vcpu.immediate_exit = 0
                loop.start()

    def snapshot(self, directory, *, end: bool = False) -> object:
        """Save the VM to ``directory`` (vmm.snapshot.persist): paused for the time it
        takes, then running again as before — or, with ``end``, ended (SNAPSHOTTED,
        status 0) once it is saved. Returns the SnapshotInfo.

        Raises:
            vmm.snapshot.SnapshotError: the directory exists, the VM ended, or a device
                cannot be saved (nothing is left half written).
        """
        from vmm.snapshot import persist
        from vmm.snapshot.format import SnapshotError
        was_paused = self.paused
        if not self.pause():
            raise SnapshotError("cannot snapshot: the VM is not running")
        ok = False
        try:
            info = persist.save(self, directory)
            ok = True
            return info
        finally:
            if end and ok:
                self.request_exit(ExitReason.SNAPSHOTTED, detail=f"snapshot saved to {directory}")
            if not was_paused:
                self.resume()

    def _console_thread(self) -> None:
        """Moves guest serial output from the shim's buffer to the console, in order.

        After each drain it sleeps CONSOLE_BATCH_S so that a guest printing in a tight
        loop wakes this thread once per batch rather than once per byte (each wake-up
        costs the vCPU an eventfd write and, on a small host, a context switch).
        """
        shim = native()
        buf = shim.ffi.new("uint8_t[]", 1 << 16)
        take, out = shim.lib.shim_tx_take, self.console.write

        failed = []

        def drain() -> None:
            while n := take(self._txbuf, buf, 1 << 16):
                try:
                    out(bytes(shim.ffi.buffer(buf, n)))
                except Exception as e:  # noqa: BLE001 - a sink's bug must not stop the
                    if not failed:      # draining: the vCPUs would wait on a full buffer
                        failed.append(e)
                        log.warning("console output failed (%s: %s); still draining",
                                    type(e).__name__, e)

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
