"""The vCPU run loops: the cffi shim (default) and its pure-Python twin.

Both loops decode each exit that reaches Python once (vmm.kvm.exits) and dispatch it
by bus. The shim additionally handles the hottest exits in C without returning to
Python: UART transmit-holding-register writes and line-status reads while the UART is
in plain polled mode (see native/shim.h and Serial8250.fast_path_state). Select the
loop with ``loop="python"`` or the environment variable ``PYVMM_LOOP=python``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from vmm.errors import UserError
from vmm.kvm import KvmError
from vmm.kvm import exits as X
from vmm.kvm import ioctls as K
from vmm.log import get_logger

log = get_logger("vmm.vcpu")

#: Signal sent to a vCPU thread to make KVM_RUN return (its handler does nothing).
KICK_SIGNAL = signal.SIGRTMIN + 2

LOOPS = ("shim", "python")


class LoopError(UserError, ValueError):
    """$PYVMM_LOOP names no run loop (one line, exit status 2)."""


def default_loop() -> str:
    loop = os.environ.get("PYVMM_LOOP", "shim")
    if loop not in LOOPS:
        raise LoopError(f"PYVMM_LOOP must be one of {', '.join(LOOPS)}, not {loop!r}")
    return loop


def native():
    """The compiled shim module (vmm._shim), or raise a one-line error."""
    try:
        from vmm import _shim
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise KvmError(f"the native shim is not built ({e}); reinstall with `pip install -e .`") from None
    return _shim


_kick_installed = False


def install_kick_handler() -> None:
    global _kick_installed
    if not _kick_installed:
        rc = native().lib.shim_install_kick_handler(KICK_SIGNAL)
        if rc < 0:
            raise KvmError(f"cannot install the vCPU kick signal handler: {os.strerror(-rc)}")
        _kick_installed = True


class VcpuLoop:
    """Runs one vCPU until the machine stops; lives on its own thread.

    The loop is handed what it needs from the machine as callables, not the machine.

    Args:
        vcpu: the vmm.kvm.Vcpu.
        loop: "shim" or "python".
        handle_exit: ``handle_exit(vcpu, exit)`` for every decoded exit (on this thread).
        stopping: returns True once the VM is ending; checked after every exit.
        fail: ``fail(error)`` ends the VM when the loop itself fails (a KVM error, a bug).
        shim_serial: the shim's ``struct shim_serial *`` (the UART fast path), or None.
    """

    def __init__(self, vcpu, loop: str, *, handle_exit: Callable[[object, object], None],
                 stopping: Callable[[], bool], fail: Callable[[BaseException], None],
                 shim_serial=None):
        self.vcpu = vcpu
        self.loop = loop
        self.handle_exit = handle_exit
        self.stopping = stopping
        self.fail = fail
        self.thread: threading.Thread | None = None
        self.exits = 0          # exits handled in Python
        self._c = None
        if loop == "shim":
            shim = native()
            self._ffi, self._lib = shim.ffi, shim.lib
            self._run_buf = self._ffi.from_buffer(vcpu.run_page)
            c = self._ffi.new("struct shim_vcpu *")
            c.fd = vcpu.fd
            c.run = self._run_buf
            c.serial = shim_serial if shim_serial is not None else self._ffi.NULL
            self._c = c

    def close(self) -> None:
        """Release the shim's view of the kvm_run page (before the vCPU fd closes)."""
        if self._c is not None:
            self._ffi.release(self._run_buf)
            self._c = None

    @property
    def fast_exits(self) -> int:
        return self._c.fast_exits if self._c is not None else 0

    # -- thread control --------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.vcpu.index}",
                                       daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN promptly (immediate_exit + a signal)."""
        self.vcpu.immediate_exit = 1
        t = self.thread
        if t is not None and t.is_alive() and t.ident is not None:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def _thread_main(self) -> None:
        try:
            self.run()
        except BaseException as e:  # noqa: BLE001 - a bug or KVM failure: stop the VM, say why
            log.debug("vCPU %d failed", self.vcpu.index, exc_info=True)
            self.fail(e)

    # -- the loops ---------------------------------------------------------------------
    def run(self) -> None:
        run_page = self.vcpu.run_page
        handle, stopping = self.handle_exit, self.stopping
        vcpu = self.vcpu
        if self.loop == "shim":
            shim_run, c = self._lib.shim_run, self._c

            def step() -> int:
                reason = shim_run(c)
                if reason < 0:
                    raise KvmError(f"KVM_RUN failed on vCPU {vcpu.index}: {os.strerror(-reason)}")
                return reason
        else:
            step = vcpu.run
        while not stopping():
            reason = step()
            self.exits += 1
            if reason == K.KVM_EXIT_INTR:
                vcpu.immediate_exit = 0
                continue
            handle(vcpu, X.decode(run_page, reason))
