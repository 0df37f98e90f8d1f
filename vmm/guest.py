"""Disposable guests: boot a Linux VM once, run commands in it, tear it down.

    from vmm import Guest

    with Guest(mem="256M") as g:              # boots the default guest (cached build)
        r = g.run("uname -r")                 # a str runs with `sh -c`
        print(r.exit_code, r.stdout, r.stderr)
        g.run(["printf", "%s\\n", "a b"])      # a list is exec'd as is
        print(g.console.decode())             # the kernel's serial log (ttyS0)

The control channel is the guest's second UART (ttyS1, COM2). /init starts
``pyvmm-agent`` (guests/agent/agent.c) on it when the kernel command line has
``pyvmm.agent``; the agent speaks the framing below and runs one command at a time with
stdin = /dev/null and its stdout and stderr on two pipes, which it forwards as they
come. Kernel messages stay on ttyS0, so they never mix with a command's output.
Why a UART rather than virtio-vsock or the console: docs/disposable-guests.md.

Frames, both directions: ``type: u8 | length: u32 LE | payload``.

==========  ======  ==========================================================
 direction   type    payload
==========  ======  ==========================================================
 host->      ``R``   u32 argc, u32 envc, NUL-terminated workdir, argv..., env...
 ->host      ``Y``   ``pyvmm-agent <version>``, once, when the agent is ready
 ->host      ``O``   a chunk of the command's stdout
 ->host      ``E``   a chunk of its stderr
 ->host      ``X``   u8 how (0 exited, 1 signal), i32 LE status or signal number
==========  ======  ==========================================================

Threads: the VM runs on a thread of its own (``pyvmm-guest``, plus its vCPU and I/O
threads); the second UART's output is parsed into frames on the vCPU thread and handed
to the caller of :meth:`Guest.run` through a queue, so streaming callbacks run on the
caller's thread. Output and EXIT frames are taken only from sending a command's RUN to
its EXIT; what the agent sends at any other time is dropped (``Guest.dropped_bytes``),
so it neither queues up on the host nor passes for the next command's result. The
queue is bounded (FRAME_QUEUE): a caller that falls behind slows the guest down. A
RunResult keeps at most RUN_KEEP bytes of each stream, none of one streamed to a
callback. A timeout stops the whole VM (a command stuck in the guest cannot be
trusted to die), and :meth:`Guest.close` (or leaving the ``with`` block) always stops
the VM, joins its threads and closes every file descriptor it opened.

Files: copy-in images and the copy-out scratch disk are made in a private temporary
directory, opened, and unlinked at once; the VMM reaches them as ``/proc/self/fd/N``.
So nothing is left on disk even if the process is SIGKILLed while the guest runs.
"""

from __future__ import annotations

import itertools
import os
import queue
import shlex
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# subprocess, shutil and tempfile are imported where they are used (copy-out, images):
# `pyvmm run` and Guest() start on this module's imports (start-up budget: README).

# --------------------------------------------------------------------------------------
# The wire protocol (see guests/agent/agent.c, which must agree)
# --------------------------------------------------------------------------------------

T_RUN = ord("R")
T_READY = ord("Y")
T_STDOUT = ord("O")
T_STDERR = ord("E")
T_EXIT = ord("X")
T_INIT = ord("I")
GUEST_FRAME_TYPES = frozenset((T_READY, T_STDOUT, T_STDERR, T_EXIT))

HEADER = struct.Struct("<BI")
#: Largest frame either side accepts (the agent refuses bigger RUN frames; its output
#: chunks are at most 4 KiB). Bounds what a confused guest can make the host buffer.
MAX_PAYLOAD = 1 << 20
PROTOCOL_VERSION = b"pyvmm-agent 1"

#: Exit status reported for a command killed by signal N (the shell convention).
SIGNAL_EXIT_BASE = 128

#: Console bytes kept by Guest.console (the oldest are dropped beyond this).
CONSOLE_KEEP = 4 << 20

#: Empty drives a guest using the snapshot cache has, for its disks (rootfs, --disk,
#: copy-in images, scratch: a guest with more boots with its disks attached instead).
EMPTY_DRIVES = 4

#: A command's stdout (and, apart, its stderr) kept for its RunResult when no callback
#: streams it: the oldest bytes are dropped beyond this. A streamed one is not kept.
RUN_KEEP = 16 << 20

#: Frames waiting between the vCPU thread that parses them and the caller of
#: Guest.run (at most MAX_PAYLOAD each; the agent's are <= 4 KiB). When the caller
#: falls behind, the vCPU waits: the guest's output is slowed, not buffered.
FRAME_QUEUE = 64

#: Where a rootfs disk is mounted in the guest (guests/initramfs/init).
ROOTFS_MOUNT = "/rootfs"
#: Environment of the host's housekeeping commands: run outside a rootfs chroot.
OUTSIDE_ROOT = {"PYVMM_OUTSIDE_ROOT": "1"}

#: Size of the scratch disk that copy_out() copies through, unless given.
DEFAULT_SCRATCH_SIZE = 256 << 20

#: Where the scratch disk is mounted in the guest while copying out.
SCRATCH_MOUNT = "/run/pyvmm-scratch"


class GuestError(Exception):
    """The guest could not be booted or stopped answering; the message says why."""

    def __init__(self, message: str, console_tail: bytes = b""):
        super().__init__(message)
        self.console_tail = console_tail


class GuestTimeout(GuestError):
    """A command (or the boot) ran past its timeout; the whole VM has been stopped.

    ``stdout`` / ``stderr`` hold what the command had written until then.
    """

    def __init__(self, message: str, console_tail: bytes = b"", stdout: bytes = b"",
                 stderr: bytes = b""):
        super().__init__(message, console_tail)
        self.stdout = stdout
        self.stderr = stderr


class ProtocolError(GuestError):
    """The guest sent something that is not a valid frame."""


def encode_run(argv: Sequence[str | bytes], env: dict[str, str] | None = None,
               workdir: str | None = None) -> bytes:
    """The RUN frame for ``argv`` (strings are UTF-8 encoded; none may contain NUL).

    Raises:
        ValueError: empty argv, a NUL byte, an env key with '=' or a frame too big.
    """
    def b(x: str | bytes) -> bytes:
        data = x if isinstance(x, bytes) else str(x).encode("utf-8", "surrogateescape")
        if b"\0" in data:
            raise ValueError(f"{x!r}: command arguments, variables and paths cannot contain NUL")
        return data

    if not argv:
        raise ValueError("empty command")
    env_items = []
    for key, value in (env or {}).items():
        if not key or "=" in key:
            raise ValueError(f"invalid environment variable name {key!r}")
        env_items.append(b(key) + b"=" + b(value))
    strings = [b(workdir or ""), *(b(a) for a in argv), *env_items]
    payload = struct.pack("<II", len(argv), len(env_items)) + b"".join(s + b"\0" for s in strings)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"command too long ({len(payload)} bytes; at most {MAX_PAYLOAD})")
    return HEADER.pack(T_RUN, len(payload)) + payload


def decode_exit(payload: bytes) -> tuple[int, int | None]:
    """An EXIT payload -> (exit_code, signal or None); a signal gives 128 + N."""
    if len(payload) != 5:
        raise ProtocolError(f"EXIT frame of {len(payload)} bytes (expected 5)")
    how, code = struct.unpack("<Bi", payload)
    if how == 1:
        return SIGNAL_EXIT_BASE + code, code
    return code, None


class FrameParser:
    """Splits a byte stream into (type, payload) frames; bounded by MAX_PAYLOAD."""

    def __init__(self, types: frozenset[int] = GUEST_FRAME_TYPES):
        self._buf = bytearray()
        self._types = types

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return the frames they completed.

        Raises:
            ProtocolError: an unknown frame type or a length over MAX_PAYLOAD (the
                stream cannot be resynchronised: the caller should give up on it).
        """
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            ftype, length = HEADER.unpack_from(self._buf)
            if ftype not in self._types:
                raise ProtocolError(f"unknown frame type {ftype:#x} from the guest agent")
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes from the guest agent "
                                    f"(at most {MAX_PAYLOAD})")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((ftype, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return frames


def init_frame() -> bytes:
    """The INIT frame for an agent restored from a snapshot (agent.c): the host's
    CLOCK_REALTIME and 64 bytes of host entropy."""
    now = time.time_ns()
    payload = struct.pack("<qq", now // 1_000_000_000, now % 1_000_000_000) + os.urandom(64)
    return HEADER.pack(T_INIT, len(payload)) + payload


# --------------------------------------------------------------------------------------
# The host side
# --------------------------------------------------------------------------------------


class RunResult:
    """What a command did: its exit status and everything it wrote.

    ``exit_code``; ``stdout``, ``stderr``; ``signal``: the signal that killed it, else
    None (exit_code is then 128 + signal); ``duration``: seconds from sending the
    command to its EXIT frame. (A plain class: importing dataclasses costs start-up.)
    """

    __slots__ = ("exit_code", "stdout", "stderr", "signal", "duration")

    def __init__(self, exit_code: int, stdout: bytes = b"", stderr: bytes = b"",
                 signal: int | None = None, duration: float = 0.0):
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.signal = signal
        self.duration = duration

    def __repr__(self) -> str:
        return (f"RunResult(exit_code={self.exit_code!r}, stdout={self.stdout!r}, "
                f"stderr={self.stderr!r}, signal={self.signal!r}, duration={self.duration!r})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, RunResult):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> "RunResult":
        """Return self, or raise GuestError when the exit code is not 0."""
        if self.exit_code != 0:
            raise GuestError(f"command failed with exit status {self.exit_code}: "
                             f"{self.stderr[-2000:].decode(errors='replace')}")
        return self


class CopyIn:
    """A host directory made into a read-only ext4 image and mounted at ``guest_path``."""

    __slots__ = ("host_path", "guest_path")

    def __init__(self, host_path: Path, guest_path: str):
        self.host_path = host_path
        self.guest_path = guest_path

    def __repr__(self) -> str:
        return f"CopyIn(host_path={self.host_path!r}, guest_path={self.guest_path!r})"


def parse_copy_spec(spec: str, what: str) -> tuple[str, str]:
    """``A:B`` -> (A, B), splitting at the last ':' (paths rarely end with one)."""
    a, sep, b = spec.rpartition(":")
    if not sep or not a or not b:
        raise ValueError(f"{what} {spec!r}: expected SOURCE:DESTINATION")
    return a, b


_ids = itertools.count(1)
_prepare_lock = threading.Lock()


class Guest:
    """A Linux VM booted once to run commands in; use it as a context manager.

    Args:
        kernel: ELF vmlinux or bzImage; default: the project's default guest (built
            and cached on first use, see vmm.guestbuild).
        initrd: initramfs with /init and /bin/pyvmm-agent; default: the default guest's.
        mem: guest RAM, e.g. "256M", or bytes.
        rootfs: a root filesystem image to run the commands in (chrooted): attached
            first, as /dev/vda, as a copy-on-write snapshot — the image is never
            modified and the overlay is gone with the VM.
        disks: extra virtio-blk disks (vmm.machine.DiskConfig or paths), /dev/vda (or
            /dev/vdb after a rootfs)... .
        copy_in: (host directory, guest path) pairs: each directory becomes a read-only
            ext4 image mounted at the guest path before the first command.
        scratch_size: size of the writable scratch disk :meth:`copy_out` needs (bytes
            or "256M"); None (default): no scratch disk, no copy_out.
        cmdline: appended to the kernel command line.
        cpu_profile: "auto", "host" or "safe" (vmm.cpuprofile).
        loop: vCPU loop, "shim" or "python" (default: $PYVMM_LOOP or shim).
        boot_timeout: seconds to wait for the agent and mount the copy-in images; the
            VM is stopped after that. Also copy_out()'s default timeout.
        console: optional callable receiving console (ttyS0) bytes as they come (on
            the VM's console thread).
        snapshot_cache: restore from / save to the cache of booted guests
            (vmm.snapshot.cache; also off with PYVMM_SNAPSHOT_CACHE=0).
        restore: a directory :meth:`snapshot` saved a guest into: start from it
            instead of booting (kernel, RAM, disks and command line are the saved
            guest's; only ``console``, ``loop`` and ``boot_timeout`` apply).
        net: a network card: "user" (passt), "tap=NAME", a vmm.config.NetConfig, or
            None / "none" (default); a guest with one always boots (no snapshot cache).
        publish: host ports forwarded to the guest with ``net="user"``
            ("8080:80", "127.0.0.1:5353:53/udp"; vmm.net.parse_publish).

    Raises (from :meth:`start`):
        GuestError: the guest did not come up (the message has the console tail).
        GuestTimeout: it did not come up within ``boot_timeout``.
    """

    def __init__(self, kernel: str | os.PathLike | None = None,
                 initrd: str | os.PathLike | None = None, mem: str | int = "256M",
                 disks: Iterable = (), copy_in: Iterable[tuple[str | os.PathLike, str]] = (),
                 scratch_size: str | int | None = None, cmdline: str = "",
                 cpu_profile: str = "auto", loop: str | None = None,
                 boot_timeout: float = 600, console: Callable[[bytes], None] | None = None,
                 rootfs: str | os.PathLike | None = None, snapshot_cache: bool = True,
                 restore: str | os.PathLike | None = None, net=None,
                 publish: Iterable[str] = ()):
        from vmm.memory import parse_size

        if isinstance(net, str) or (net is None and publish):
            from vmm.net import parse_net
            net = parse_net(net or "none", publish)  # NetError (a UserError) at once
        self.net = net

        self.kernel = Path(kernel) if kernel is not None else None
        self.initrd = Path(initrd) if initrd is not None else None
        self.mem_size = parse_size(mem)
        self.disks = list(disks)
        self.rootfs = Path(rootfs) if rootfs is not None else None
        #: Where the commands' root directory is, seen from the agent (housekeeping
        #: commands run outside the chroot, with PYVMM_OUTSIDE_ROOT=1).
        self._root = ROOTFS_MOUNT if rootfs is not None else ""
        self.copy_in = [CopyIn(Path(h), g) for h, g in copy_in]
        for c in self.copy_in:
            if not c.host_path.is_dir():
                raise GuestError(f"copy-in {c.host_path}: not a directory")
            if not c.guest_path.startswith("/"):
                raise GuestError(f"copy-in {c.guest_path}: the guest path must be absolute")
        self.scratch_size = parse_size(scratch_size) if scratch_size is not None else None
        self.cmdline = cmdline
        self.cpu_profile = cpu_profile
        self.loop = loop
        self.boot_timeout = boot_timeout
        #: Start from a cached snapshot of this guest's shape when there is one, and
        #: save one after booting when there is not (vmm.snapshot.cache; the disks are
        #: inserted afterwards into empty drives). True after start() if restored.
        self.snapshot_cache = snapshot_cache
        self.restore_from = None if restore is None else Path(restore)
        if self.restore_from is not None and (self.disks or self.copy_in or self.rootfs
                                              or self.scratch_size is not None):
            raise GuestError("a guest restored from a snapshot has the saved guest's disks: "
                             "no rootfs, disks, copy_in or scratch_size")
        self.restored = False
        self._console_sink = console
        self.name = f"pyvmm-guest-{next(_ids)}"
        #: Things worth telling a user once (e.g. that the host is emulation-only).
        self.notes: list[str] = []
        #: Phase times (time.monotonic()): "start", "ready", "closed".
        self.times: dict[str, float] = {}
        #: How the VM ended (vmm.machine.VmExit), once it has.
        self.vm_exit = None

        self._console = bytearray()
        self._console_lock = threading.Lock()
        self._machine = None
        self._thread: threading.Thread | None = None
        self._frames: queue.Queue = queue.Queue(FRAME_QUEUE)
        #: True from sending a RUN to its EXIT: output frames are taken only then;
        #: the agent's frames at any other time are dropped (counted here), so they
        #: can neither queue up nor pass for the next command's output or status.
        self._running = False
        self.dropped_bytes = 0
        self._parser = FrameParser()
        self._ready = threading.Event()
        self._run_lock = threading.Lock()
        self._fds: list[int] = []           # unlinked images the VMM reads via /proc/self/fd
        self._media: list = []              # disks opened, not yet inserted (closed here)
        self._scratch_fd: int | None = None
        self._scratch_dev: str | None = None
        self._dead: str | None = None       # why no more commands can run
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "Guest":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Guest":
        """Boot the VM and wait until the agent is ready (idempotent)."""
        if self._closed:
            raise GuestError("this guest has been closed")
        if self._started:
            return self
        self._started = True
        self.times["start"] = time.monotonic()
        try:
            self._boot()
        except BaseException as e:
            self._dead = self._dead or f"the guest did not start ({type(e).__name__}: {e})"
            raise
        return self

    def _boot(self) -> None:
        if self.restore_from is not None:
            return self._start_machine(self._restore_directory(), None, [])
        from vmm import defaultguest, linux
        from vmm.machine import DiskConfig, Machine, MachineConfig
        from vmm.vcpu import default_loop

        kernel, initrd = self.kernel, self.initrd
        if kernel is None or initrd is None:
            default_kernel, default_initrd = defaultguest.default_guest()
            kernel = kernel or default_kernel
            initrd = initrd or default_initrd
        # The disks in drive order (/dev/vda, ...): rootfs, --disk, copy-in, scratch.
        disks = [d if isinstance(d, DiskConfig) else DiskConfig(Path(d)) for d in self.disks]
        if self.rootfs is not None:
            disks.insert(0, DiskConfig(self.rootfs, snapshot=True))
        mounts = []
        for c in self.copy_in:
            fd = self._image(c.host_path)
            mounts.append((_vd(len(disks)), c.guest_path))
            disks.append(DiskConfig(Path(f"/proc/self/fd/{fd}"), read_only=True))
        if self.scratch_size is not None:
            self._scratch_fd = self._image(None, self.scratch_size)
            self._scratch_dev = _vd(len(disks))
            disks.append(DiskConfig(Path(f"/proc/self/fd/{self._scratch_fd}"), cache="unsafe"))
        # With the snapshot cache, every guest boots (or is restored) with the same
        # EMPTY_DRIVES empty drives, so that one snapshot serves all of them, and its
        # disks are inserted once the agent is ready (vmm/disk/empty.py).
        late = self._cache_enabled() and len(disks) <= EMPTY_DRIVES and self.net is None
        extra = [defaultguest.AGENT_PARAM]
        if self.rootfs is not None and not late:
            extra.append(f"{defaultguest.ROOTFS_PARAM}=/dev/vda")
        media = []
        if late:   # opened now: a disk that cannot be used fails before any boot
            from vmm.disk import open_disk
            for d in disks:
                media.append(open_disk(d.path, read_only=d.read_only, cache=d.cache,
                                       snapshot=d.snapshot))
                self._media.append(media[-1])
        with _prepare_lock:   # the host probe is cached per process; probe it once
            setup = linux.prepare(self.cpu_profile, 1,
                                  extra=" ".join(x for x in (*extra, self.cmdline) if x))
        self.notes.extend(setup.notes)
        loop = self.loop or default_loop()
        config = MachineConfig(kernel=Path(kernel), mem_size=self.mem_size, kind="linux",
                               initrd=Path(initrd), cmdline=setup.cmdline,
                               loop=loop, console=self._on_console,
                               markers={defaultguest.READY_MARKER.encode(): "ready"},
                               quirks=setup.quirks, serial2=self._on_serial2,
                               disks=[DiskConfig.empty() for _ in range(EMPTY_DRIVES)]
                               if late else disks, cpu_profile=setup.profile,
                               net=self.net)
        cache_key = self._cache_key(config) if late else None
        machine = self._restore(cache_key, loop) if cache_key else None
        self._start_machine(machine or Machine(config), cache_key, mounts, disks, media)

    def _start_machine(self, machine, cache_key, mounts, disks=(), media=()) -> None:
        """Run ``machine``, wait for the agent, fill the cache, insert and mount disks."""
        self._machine = machine
        self.notes.extend(self._machine.notes)
        self._thread = threading.Thread(target=self._vm_main, name=self.name, daemon=True)
        self._thread.start()
        if self.restored:
            self._send_init()
        if not self._ready.wait(self.boot_timeout):
            self._stop(f"the guest agent was not ready after {self.boot_timeout} s")
            raise GuestTimeout(f"{self.name}: the guest agent was not ready after "
                               f"{self.boot_timeout} s; the VM was stopped", self.console_tail())
        if self._dead is not None:
            raise GuestError(f"{self.name}: {self._dead}", self.console_tail())
        self.times["ready"] = time.monotonic()
        if cache_key and not self.restored:
            self._save_to_cache(cache_key)
        # Housekeeping is part of the boot: bounded by what is left of boot_timeout.
        boot_deadline = self.times["start"] + self.boot_timeout
        commands = []
        if media:
            # One process does it all (agent.c --mount): processes are dear here.
            ops = self._insert_media(disks, media)
            for dev, path in mounts:
                ops += ["ro", dev, self._root + path]
            commands.append((["/bin/pyvmm-agent", "--mount", *ops], "the disks"))
        else:
            for dev, path in mounts:
                q = shlex.quote(self._root + path)
                commands.append((f"mkdir -p {q} && mount -t ext4 -o ro {dev} {q}",
                                 f"the copy-in {path}"))
        for cmd, what in commands:
            try:
                self.run(cmd, env=OUTSIDE_ROOT,
                         timeout=max(boot_deadline - time.monotonic(), 0.001)).check()
            except GuestTimeout as e:
                raise GuestTimeout(f"{self.name}: mounting {what} did not finish "
                                   f"within the boot timeout ({self.boot_timeout} s); the VM "
                                   "was stopped", e.console_tail) from None
        if commands:
            self.times["mounted"] = time.monotonic()

    def _restore_directory(self):
        """The Machine of ``Guest(restore=DIRECTORY)``."""
        from vmm.machine import Machine
        from vmm.snapshot import persist
        from vmm.vcpu import default_loop
        snap, config = persist.load(str(self.restore_from), console=self._on_console,
                                    serial2=self._on_serial2, loop=self.loop or default_loop())
        self.restored = True
        self.times["restored"] = time.monotonic()
        return Machine(config, snapshot=snap)

    def snapshot(self, directory: str | os.PathLike):
        """Save this guest, between commands, into ``directory`` (absent or empty);
        ``Guest(restore=directory)`` starts a guest from it, in this process or
        another: memory, processes, files and a rootfs overlay as they were; the
        restored guest's clock and RNG are set anew (as for the snapshot cache).

        Returns:
            the vmm.snapshot.format.SnapshotInfo (size, time taken).
        Raises:
            GuestError: the guest is not running, or has copy-in images or a scratch
                disk (temporary files of this process, which no snapshot can keep).
            vmm.snapshot.format.SnapshotError: the directory is taken, or saving failed
                (nothing is left half written).
        """
        if self.copy_in or self.scratch_size is not None:
            raise GuestError("a guest with copy-in images or a scratch disk cannot be saved "
                             "(they are temporary files of this process)")
        self.start()
        with self._run_lock:
            self._check_alive()
            return self._machine.snapshot(os.fspath(directory))

    def _cache_enabled(self) -> bool:
        from vmm.snapshot import cache
        return self.snapshot_cache and cache.enabled()

    def _insert_media(self, disks: list, media: list) -> list[str]:
        """Insert the opened ``media`` into the empty drives; return the operations
        for ``pyvmm-agent --mount`` (agent.c) that wait until the guest has seen each
        one (Linux's virtio_blk reads the new capacity on a workqueue after the
        configuration-change interrupt) and mount a rootfs as guests/initramfs/init
        would have at boot."""
        from vmm.config import DiskConfig
        ops = []
        for i, (d, backend) in enumerate(zip(disks, media)):
            self._machine.insert_disk(i, DiskConfig(backend.path, read_only=d.read_only,
                                                    serial=d.serial, cache=d.cache,
                                                    snapshot=d.snapshot), backend=backend)
            self._media.remove(backend)   # the machine owns it now
            ops += ["wait", _vd(i)[len("/dev/"):]]
        if self.rootfs is not None:   # agent.c records it: later commands chroot there
            ops += ["root", "/dev/vda", ROOTFS_MOUNT]
        return ops

    def close(self) -> None:
        """Stop the VM, join its threads, close its fds (idempotent; never raises)."""
        if self._closed:
            return
        self._closed = True
        self._dead = self._dead or "the guest has been closed"
        if self._machine is not None:
            self._machine.stop()
        if self._thread is not None:
            self._thread.join()
        if self._machine is not None:
            self._machine.close()
            self._machine = None
        for backend in self._media:
            backend.close()
        self._media.clear()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self.times["closed"] = time.monotonic()

    @property
    def alive(self) -> bool:
        return self._started and self._dead is None

    # -- commands ----------------------------------------------------------------------
    def run(self, cmd: str | Sequence[str], timeout: float | None = None,
            env: dict[str, str] | None = None, workdir: str | None = None,
            stdout: Callable[[bytes], None] | None = None,
            stderr: Callable[[bytes], None] | None = None) -> RunResult:
        """Run ``cmd`` in the guest and wait for it.

        Args:
            cmd: a str runs with ``sh -c``; a list is exec'd directly (PATH lookup).
            timeout: seconds; past it the whole VM is stopped and GuestTimeout raised.
            env: variables added to the agent's environment (PATH, HOME, TERM).
            workdir: directory to run in (default /).
            stdout, stderr: called with each chunk as it arrives (on this thread).
                A stream given a callback is not kept: its RunResult field is b"".

        Returns:
            A RunResult (exit_code, stdout, stderr, signal, duration); each of stdout
            and stderr holds at most the last RUN_KEEP bytes (16 MiB).

        Raises:
            GuestTimeout: the timeout passed (the guest is gone afterwards).
            GuestError: the guest is not running or died during the command.
            ValueError: a NUL byte in the command, env or workdir.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        frame = encode_run(argv, env, workdir)
        self.start()
        with self._run_lock, _Answering(self):
            self._check_alive()
            t0 = time.monotonic()
            deadline = None if timeout is None else t0 + timeout
            out, err = bytearray(), bytearray()

            def timed_out() -> GuestTimeout:
                self._stop(f"a command timed out after {timeout} s")
                return GuestTimeout(f"{self.name}: command timed out after {timeout} s; "
                                    "the guest was stopped", self.console_tail(),
                                    bytes(out), bytes(err))

            if not self._send(frame, deadline):
                self._check_alive()
                raise timed_out()
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise timed_out()
                try:   # in slices: a VM that ended is noticed even with nothing queued
                    ftype, payload = self._frames.get(timeout=0.25 if left is None
                                                      else min(left, 0.25))
                except queue.Empty:
                    if self._dead is not None:
                        raise GuestError(f"{self.name}: {self._dead}",
                                         self.console_tail()) from None
                    continue
                if ftype == T_STDOUT:
                    if stdout is not None:
                        stdout(payload)
                    else:
                        _keep(out, payload)
                elif ftype == T_STDERR:
                    if stderr is not None:
                        stderr(payload)
                    else:
                        _keep(err, payload)
                elif ftype == T_EXIT:
                    code, sig = decode_exit(payload)
                    return RunResult(code, bytes(out), bytes(err), sig, time.monotonic() - t0)
                elif ftype is None:   # the VM ended, or the channel broke
                    raise GuestError(f"{self.name}: {payload}", self.console_tail())

    def copy_out(self, guest_path: str, host_path: str | os.PathLike,
                 timeout: float | None = None) -> Path:
        """Copy a file or directory tree from the guest to the host, like ``cp -a``.

        The guest copies ``guest_path`` into the scratch disk (``scratch_size``), and the
        host extracts it with ``debugfs -R rdump`` (e2fsprogs; no root, no mount).
        If ``host_path`` is an existing directory the copy lands inside it.
        ``timeout`` bounds the copy in the guest and the extraction (default: the
        guest's boot_timeout): an agent that stops answering cannot hang it.

        Returns:
            The path of the copy on the host.
        Raises:
            GuestError: no scratch disk, the guest path is missing, or debugfs failed.
            GuestTimeout: the timeout passed (the guest is gone afterwards).
        """
        if timeout is None:
            timeout = self.boot_timeout
        deadline = time.monotonic() + timeout
        if self._scratch_dev is None:
            raise GuestError("copy_out needs a scratch disk: Guest(..., scratch_size='256M')")
        host_path = Path(host_path)
        dest = host_path / Path(guest_path).name if host_path.is_dir() else host_path
        if dest.exists():
            raise GuestError(f"copy-out {guest_path}: {dest} already exists")
        m, src = SCRATCH_MOUNT, shlex.quote(self._root + guest_path)
        script = (f"test -e {src} || {{ echo \"no such file or directory: {guest_path}\" >&2; exit 2; }}; "
                  f"mkdir -p {m} && mount -t ext4 {self._scratch_dev} {m} && rm -rf {m}/out && "
                  f"cp -a {src} {m}/out; s=$?; umount {m}; exit $s")
        r = self.run(script, timeout=timeout, env=OUTSIDE_ROOT)
        if r.exit_code != 0:
            raise GuestError(f"copy-out {guest_path} failed in the guest (status {r.exit_code}): "
                             f"{r.stderr.decode(errors='replace').strip()}")
        debugfs = _tool("debugfs")
        import subprocess
        import tempfile
        with tempfile.TemporaryDirectory(prefix=".pyvmm-copyout-", dir=dest.parent) as tmp:
            fd = self._scratch_fd
            try:
                proc = subprocess.run([debugfs, "-R", f"rdump /out {tmp}", f"/proc/self/fd/{fd}"],
                                      pass_fds=(fd,), capture_output=True, text=True,
                                      stdin=subprocess.DEVNULL,
                                      timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                raise GuestTimeout(f"copy-out {guest_path}: debugfs did not finish within "
                                   f"{timeout} s") from None
            got = Path(tmp) / "out"
            if proc.returncode != 0 or not (got.exists() or got.is_symlink()):
                raise GuestError(f"copy-out {guest_path}: debugfs rdump failed: "
                                 f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            os.rename(got, dest)
        return dest

    # -- the console ---------------------------------------------------------------------
    @property
    def console(self) -> bytes:
        """Everything the guest printed on its console (ttyS0) so far."""
        with self._console_lock:
            return bytes(self._console)

    def console_tail(self, n: int = 4000) -> bytes:
        with self._console_lock:
            return bytes(self._console[-n:])

    # -- internals -------------------------------------------------------------------------
    def _image(self, source: Path | None, size: int | None = None) -> int:
        """Make an ext4 image, open it, unlink it; return the fd the VMM reaches it by."""
        import shutil
        import tempfile
        from vmm.images import make_ext4

        tmp = tempfile.mkdtemp(prefix="pyvmm-img-")
        try:
            path = make_ext4(source, Path(tmp) / "disk.img", size)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._fds.append(fd)
        return fd

    # -- the snapshot cache (vmm.snapshot.cache) -------------------------------------------
    def _cache_key(self, config) -> str | None:
        from vmm.snapshot import cache
        if not self.snapshot_cache or not cache.enabled():
            return None
        try:
            return cache.key(kernel=config.kernel, initrd=config.initrd, mem_size=config.mem_size,
                             cpus=config.cpus, cmdline=config.cmdline, quirks=config.quirks)
        except OSError:
            return None

    def _restore(self, key: str, loop: str):
        """A Machine restored from the cached snapshot for ``key``, or None (no such
        snapshot, or one this host cannot use: then the guest boots)."""
        from vmm.machine import Machine
        from vmm.snapshot import cache, persist
        from vmm.snapshot.format import SnapshotError
        directory = cache.lookup(key)
        if directory is None:
            return None
        try:
            snap, config = persist.load(directory, console=self._on_console,
                                        serial2=self._on_serial2, loop=loop)
            machine = Machine(config, snapshot=snap)
        except SnapshotError as e:
            self.notes.append(f"note: cached snapshot not used ({e}); booting")
            cache.remove(key)
            return None
        self.restored = True
        self.times["restored"] = time.monotonic()
        self.notes.append(f"note: started from a cached snapshot ({key})")
        return machine

    def _send_init(self) -> None:
        """Tell a restored guest's agent the time and give it fresh entropy (agent.c,
        INIT): guests restored from one snapshot must not share a clock or an RNG."""
        self._send(init_frame(), time.monotonic() + self.boot_timeout)

    def _save_to_cache(self, key: str) -> None:
        """Save the just-booted guest (agent ready, nothing run yet) for later guests.
        A failure (a full disk, another process saving the same key first) only means
        the next guest boots too."""
        from vmm.snapshot import cache
        from vmm.errors import UserError
        try:
            self._machine.snapshot(cache.path_for(key))
        except (UserError, OSError) as e:
            if cache.lookup(key) is None:
                self.notes.append(f"note: could not save a snapshot for later guests ({e})")
            return
        cache.stored(key)
        self.times["saved"] = time.monotonic()

    def _vm_main(self) -> None:
        try:
            result = self._machine.run()
        except BaseException as e:  # noqa: BLE001 - report it through the queue
            from vmm.machine import ExitReason, VmExit
            result = VmExit(ExitReason.ERROR, 1, f"{type(e).__name__}: {e}")
        self.vm_exit = result
        why = f"the guest ended ({result.reason.value}" + (f": {result.detail})" if result.detail else ")")
        self._dead = self._dead or why
        self._tell_runner(self._dead)
        self._ready.set()

    def _stop(self, why: str) -> None:
        self._dead = self._dead or why
        if self._machine is not None:
            self._machine.stop()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise GuestError(f"{self.name}: no command can run: {self._dead}", self.console_tail())

    def _on_console(self, data: bytes) -> None:
        with self._console_lock:
            self._console += data
            if len(self._console) > CONSOLE_KEEP:
                del self._console[:len(self._console) - CONSOLE_KEEP]
        if self._console_sink is not None:
            self._console_sink(data)

    def _on_serial2(self, data: bytes) -> None:
        """Bytes from ttyS1, on a vCPU thread: parse, hand frames to the run() caller."""
        try:
            frames = self._parser.feed(data)
        except ProtocolError as e:
            self._stop(str(e))
            self._tell_runner(str(e))
            return
        for ftype, payload in frames:
            if ftype == T_READY:
                if payload.split(b" ")[0] != PROTOCOL_VERSION.split(b" ")[0]:
                    self._stop(f"unexpected agent greeting {payload!r}")
                self._ready.set()
            elif not self._running:   # no command asked for it: dropped, not queued
                self.dropped_bytes += len(payload)
            else:
                if ftype == T_EXIT:   # the command's last frame: nothing after it is its
                    self._running = False
                while True:           # a full queue: wait for run() (or the VM's end)
                    try:
                        self._frames.put((ftype, payload), timeout=0.1)
                        break
                    except queue.Full:
                        if self._dead is not None or (ftype != T_EXIT and not self._running):
                            break

    def _tell_runner(self, why: str) -> None:
        """Wake a waiting run() with why the guest is gone (it also polls _dead)."""
        try:
            self._frames.put_nowait((None, why))
        except queue.Full:
            pass

    def _send(self, data: bytes, deadline: float | None) -> bool:
        """Feed ``data`` to ttyS1's bounded receive FIFO; False if the deadline passed.

        Only as many bytes as there is room for are enqueued (more would be dropped
        as an overrun); the guest drains the FIFO on its receive interrupts.
        """
        serial2 = self._machine.serial2
        view = memoryview(data)
        while view:
            if self._dead is not None:
                return False
            space = serial2.input_space()
            if space:
                view = view[serial2.enqueue_input(view[:space]):]
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True


class _Answering:
    """While a run() waits for its answer: the agent's output frames are taken (see
    Guest._running); anything left queued by an earlier run() that raised is dropped
    first, so it cannot pass for this command's output or status."""

    __slots__ = ("guest",)

    def __init__(self, guest: Guest):
        self.guest = guest

    def __enter__(self) -> None:
        try:
            while True:
                self.guest._frames.get_nowait()
        except queue.Empty:
            pass
        self.guest._running = True

    def __exit__(self, *exc) -> None:
        self.guest._running = False


def _keep(buf: bytearray, data: bytes) -> None:
    """Append ``data`` to ``buf``, keeping at most its last RUN_KEEP bytes."""
    buf += data
    if len(buf) > RUN_KEEP:
        del buf[:len(buf) - RUN_KEEP]


def _vd(index: int) -> str:
    """The guest device name of the index-th virtio-blk disk: /dev/vda, /dev/vdb, ..."""
    if index >= 26:
        raise GuestError("at most 26 disks (including copy-in images and the scratch disk)")
    return "/dev/vd" + chr(ord("a") + index)


def _tool(name: str) -> str:
    import shutil
    path = shutil.which(name) or next((p for p in (f"/sbin/{name}", f"/usr/sbin/{name}")
                                       if os.path.exists(p)), None)
    if path is None:
        raise GuestError(f"{name} not found: install e2fsprogs (scripts/setup-host.sh)")
    return path
