"""``pyvmm boot`` of the default guest from its cached "shell ready" snapshot.

The first ``pyvmm boot`` of the default guest (of a shape: RAM, vCPUs, command line,
CPU profile) boots it with ``pyvmm.shell-agent`` on the kernel command line: /init
starts the agent (guests/agent/agent.c) as a daemon on ttyS1 and waits for it before
starting the shell. When the agent says READY, pyvmm saves the machine into the
snapshot cache (vmm/snapshot/cache.py) and then sends it INIT. Later boots of that
shape restore the snapshot instead and send INIT: the agent sets the guest's clock from
the host's and reseeds its RNG (two guests restored from one snapshot are not clones),
then lets /init go on, and the shell prints its prompt in the session that shows it --
within about a second of exec on an emulation-only host instead of a ~45 s boot.

Off with ``--no-snapshot-cache`` or ``PYVMM_SNAPSHOT_CACHE=0``; only for the default
guest with no disks, no ``--cmdline-replace`` and no ``--snapshot-on``.
"""

from __future__ import annotations

import threading
import time

#: How long to wait for room in ttyS1's receive FIFO for the INIT frame.
SEND_TIMEOUT_S = 30


class ShellSnapshot:
    """Builds the machine for ``pyvmm boot`` (restored or booted) and does the agent's
    side of the handshake above. ``notes``: a callable taking note lines (set by the
    CLI's session)."""

    def __init__(self, key: str):
        from vmm.guest import FrameParser
        self.key = key
        self.notes = lambda *lines: None
        self.parser = FrameParser()
        self.machine = None
        self.restored = False
        self._ready_seen = False
        self._threads: list[threading.Thread] = []

    def build(self, config):
        """The Machine: restored from the cached snapshot if there is a usable one,
        else built from ``config`` (whose serial2 is pointed at the agent)."""
        from vmm.machine import Machine
        from vmm.snapshot import cache, persist
        from vmm.snapshot.format import SnapshotError
        directory = cache.lookup(self.key)
        machine = None
        if directory is not None:
            try:
                snap, restored_config = persist.load(
                    directory, console=config.console, serial2=self.on_serial2,
                    loop=config.loop, markers=config.markers)
                machine = Machine(restored_config, snapshot=snap)
                self.restored = True
                self.notes(f"note: started from a cached snapshot ({self.key})")
            except SnapshotError as e:
                self.notes(f"note: cached snapshot not used ({e}); booting")
                cache.remove(self.key)
        if machine is None:
            self.restored = False
            self._ready_seen = False
            config.serial2 = self.on_serial2
            machine = Machine(config)
        self.machine = machine
        if self.restored:
            self._start(self._send_init)
        return machine

    def on_serial2(self, data: bytes) -> None:
        """Bytes the agent wrote (vCPU thread): on a booted guest's first READY, save
        the snapshot and then send INIT (from a thread of its own: a vCPU thread cannot
        wait for the pause)."""
        from vmm.guest import T_READY, ProtocolError
        try:
            frames = self.parser.feed(data)
        except ProtocolError:
            return      # an agent that speaks nonsense gets no INIT: /init times out
        for ftype, _ in frames:
            if ftype == T_READY and not self._ready_seen and not self.restored:
                self._ready_seen = True
                self._start(self._save_then_init)

    def _start(self, target) -> None:
        t = threading.Thread(target=target, name="shell-snapshot", daemon=True)
        self._threads.append(t)
        t.start()

    def _save_then_init(self) -> None:
        from vmm.errors import UserError
        from vmm.snapshot import cache
        try:
            self.machine.snapshot(cache.path_for(self.key))
            cache.stored(self.key)
        except (UserError, OSError) as e:
            if cache.lookup(self.key) is None:
                self.notes(f"note: could not save the shell-ready snapshot ({e})")
        self._send_init()

    def _send_init(self) -> None:
        from vmm.guest import init_frame
        serial2 = self.machine.serial2
        view = memoryview(init_frame())
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while view and not self.machine.stopping and time.monotonic() < deadline:
            space = serial2.input_space()
            if space:
                view = view[serial2.enqueue_input(view[:space]):]
            else:
                time.sleep(0.001)

    def join(self) -> None:
        for t in self._threads:
            t.join()


def shell_key(**shape) -> str | None:
    """The cache key of a default guest's "shell ready" snapshot (``shape``: the
    keyword arguments of vmm.snapshot.cache.key); None if a file cannot be read."""
    from vmm.snapshot import cache
    try:
        return "shell-" + cache.key(**shape)
    except OSError:
        return None
