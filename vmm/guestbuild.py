"""Build (once) and cache pyvmm's default Linux guest: a small kernel and a busybox initramfs.

The kernel is Debian's ``linux-source-6.1`` configured from ``make tinyconfig`` plus the
fragment ``guests/linux/pyvmm.config``, with the patches in ``guests/linux/patches``
applied (one of them lets user space make system calls on emulation-only nested KVM
hosts: see docs/emulation-only-hosts.md and the patch itself). The initramfs is an *uncompressed*
newc cpio holding Debian's static busybox, its applet links, ``guests/initramfs/init`` and
``/bin/pyvmm-agent`` (``guests/agent/agent.c``, compiled here with ``gcc -static -Os``: the
command runner of disposable guests, docs/disposable-guests.md).

Everything is built outside the repository, in the cache directory::

    ${PYVMM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/pyvmm}/
        linux-tree-<key>/        extracted + patched source and objects (reused by
                                 every compression variant; shares the kernel key
                                 minus the compression)
        kernel-<key>/            bzImage, vmlinux, System.map, config, build.log
        initramfs-<key>/         initramfs.cpio
        kernel-<key>.log         the make log (kept on failure, named in the error)
        .lock-*                  fcntl.flock locks: concurrent builders wait, then reuse

``<key>`` is a truncated sha256 of every input (source package version, fragment,
patches, compression, :data:`BUILD_RECIPE_VERSION`; for the initramfs: the init script
the busybox binary, the agent's source and the C compiler's version), so editing an input selects a fresh directory and old ones
can simply be deleted. Result directories appear atomically (built under a temporary
name, then renamed), so a directory that exists is complete.

Public API: :func:`build_kernel`, :func:`build_initramfs`, :func:`default_guest`,
:func:`command_param` and the marker constants.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping
from vmm.errors import HostError

# --------------------------------------------------------------------------------------
# Constants shared with the guest's /init and with the tests
# --------------------------------------------------------------------------------------

from vmm.guestdefs import (AGENT_PARAM, BUILD_RECIPE_VERSION, CMD_PARAM,  # noqa: F401
                           EXIT_MARKER, READY_MARKER, ROOTFS_PARAM)
from vmm.paths import cache_dir as _cache_dir, guests_dir

#: Matches the exit line; group 1 is the command's exit status.
EXIT_MARKER_RE = re.compile(r"pyvmm: exit (\d+)")
#: Where the agent lives in the initramfs.
AGENT_GUEST_PATH = "bin/pyvmm-agent"

#: bzImage payload compressions :func:`build_kernel` can produce -> Kconfig symbol.
#: (LZO is left out: it needs ``lzop``, which the host setup does not install.)
COMPRESSIONS: Mapping[str, str] = {
    "gzip": "CONFIG_KERNEL_GZIP",
    "bzip2": "CONFIG_KERNEL_BZIP2",
    "lzma": "CONFIG_KERNEL_LZMA",
    "xz": "CONFIG_KERNEL_XZ",
    "lzo": "CONFIG_KERNEL_LZO",
    "lz4": "CONFIG_KERNEL_LZ4",
    "zstd": "CONFIG_KERNEL_ZSTD",
}
_SUPPORTED_COMPRESSIONS = ("gzip", "bzip2", "lzma", "xz", "lz4", "zstd")

GUESTS_DIR = Path(guests_dir())
FRAGMENT_PATH = GUESTS_DIR / "linux" / "pyvmm.config"
PATCHES_DIR = GUESTS_DIR / "linux" / "patches"
INIT_SCRIPT_PATH = GUESTS_DIR / "initramfs" / "init"
AGENT_SOURCE_PATH = GUESTS_DIR / "agent" / "agent.c"

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
#: Debian's busybox-static installs a static binary here; override with PYVMM_BUSYBOX.
DEFAULT_BUSYBOX = Path("/bin/busybox")

_KEY_LEN = 16
_MAKE_ARCH = "ARCH=x86_64"
_TREE_STAMP = ".pyvmm-tree-ready"
_SETUP_HINT = "run scripts/setup-host.sh"


class GuestBuildError(HostError):
    """A guest build could not run or failed; the message is one line for the user."""


@dataclass(frozen=True)
class KernelBuild:
    """The artifacts of one kernel build (all inside one cache directory).

    Attributes:
        bzimage: the bootable bzImage (payload compressed as requested).
        vmlinux: the uncompressed ELF kernel (what pyvmm starts by default).
        system_map: symbol addresses (to look up e.g. ``entry_SYSCALL_64``).
        config: the final ``.config``.
    """

    bzimage: Path
    vmlinux: Path
    system_map: Path
    config: Path


# --------------------------------------------------------------------------------------
# Cache location and keys
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the cache root (vmm.paths.cache_dir) as a Path (not created here)."""
    return Path(_cache_dir())


def _digest(obj: object) -> str:
    """sha256 of a JSON-serialisable description of inputs, truncated for paths."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:_KEY_LEN]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_cache_key(source_version: str, fragment: bytes,
                   patches: list[tuple[str, bytes]]) -> str:
    """Key of the shared source/object tree: all kernel inputs except the compression.

    Args:
        source_version: the ``linux-source-6.1`` package version.
        fragment: contents of the config fragment.
        patches: (file name, contents) of each patch, in application order.
    """
    return _digest({
        "recipe": BUILD_RECIPE_VERSION,
        "what": "linux-tree",
        "source": source_version,
        "fragment": _sha256(fragment),
        "patches": [[name, _sha256(data)] for name, data in patches],
    })


def kernel_cache_key(source_version: str, fragment: bytes,
                     patches: list[tuple[str, bytes]], compression: str) -> str:
    """Key of one kernel build: every input, including the payload compression.

    Args: as :func:`tree_cache_key`, plus ``compression`` (a key of COMPRESSIONS).
    """
    return _digest({
        "recipe": BUILD_RECIPE_VERSION,
        "what": "kernel",
        "tree": tree_cache_key(source_version, fragment, patches),
        "compression": compression,
    })


def initramfs_cache_key(init_script: bytes, busybox: bytes, agent_source: bytes = b"",
                        compiler: str = "") -> str:
    """Key of the initramfs: the init script, the busybox binary (which also fixes
    the applet list), and the agent's C source and the compiler that builds it (its
    ``gcc --version`` line)."""
    return _digest({
        "recipe": BUILD_RECIPE_VERSION,
        "what": "initramfs",
        "init": _sha256(init_script),
        "busybox": _sha256(busybox),
        "agent": _sha256(agent_source),
        "cc": compiler,
    })


# --------------------------------------------------------------------------------------
# Kconfig fragment handling
# --------------------------------------------------------------------------------------

_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Parse ``.config``-style text into ``{symbol: value}``.

    ``# CONFIG_FOO is not set`` becomes ``"n"``; other comments and blank lines are
    ignored; a later line overrides an earlier one (as in Kconfig).
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _SET_RE.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET_RE.match(line):
            values[m.group(1)] = "n"
    return values


def check_config(fragment: str, config: str) -> list[str]:
    """Return the fragment options that did not take effect in a final ``.config``.

    A symbol missing from ``config`` counts as ``n`` (Kconfig omits symbols whose
    dependencies are unmet), so ``# CONFIG_X is not set`` is satisfied by absence
    while ``CONFIG_X=y`` is not.

    Args:
        fragment: the wanted options (``.config`` syntax).
        config: the ``.config`` text produced by ``olddefconfig``.

    Returns:
        One human-readable line per mismatch, e.g.
        ``"CONFIG_TMPFS: wanted y, got n"``; empty when all took effect.
    """
    have = parse_config(config)
    return [
        f"{sym}: wanted {want}, got {have.get(sym, 'n')}"
        for sym, want in parse_config(fragment).items()
        if have.get(sym, "n") != want
    ]


def effective_fragment(fragment: str, compression: str) -> str:
    """The fragment as applied for ``compression``: any payload-compression lines in
    ``fragment`` are dropped and the chosen ``CONFIG_KERNEL_<X>=y`` appended."""
    if compression not in _SUPPORTED_COMPRESSIONS:
        raise GuestBuildError(
            f"unknown kernel compression {compression!r}; "
            f"choose one of {', '.join(_SUPPORTED_COMPRESSIONS)}")
    symbols = set(COMPRESSIONS.values())
    kept = [line for line in fragment.splitlines()
            if not any(s in symbols for s in _symbols_in(line))]
    kept.append(f"{COMPRESSIONS[compression]}=y")
    return "\n".join(kept) + "\n"


def _symbols_in(line: str) -> list[str]:
    m = _SET_RE.match(line.strip()) or _UNSET_RE.match(line.strip())
    return [m.group(1)] if m else []


# --------------------------------------------------------------------------------------
# Locks, progress, subprocesses
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path, progress: "_Progress") -> Iterator[None]:
    """Hold an exclusive fcntl.flock on ``path`` (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.step("waiting for another build to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Progress:
    """Says what a long build is doing: on a terminal, a rich spinner on stderr with the
    elapsed time and the current step; otherwise one line when the build starts (what,
    about how long, where its log is) and one when it ends, so that a CI log or a
    redirected stderr shows why pyvmm is busy without a line per step.

    Args:
        title: e.g. "Building guest kernel (gzip)".
        estimate: rough duration, e.g. "about 5 minutes", or "".
        log: the build log's path, or None.
    """

    def __init__(self, title: str, estimate: str = "", log: Path | None = None) -> None:
        self.title = title
        self.estimate = estimate
        self.log = log
        self.current = ""
        self.start = time.monotonic()
        self._status = None

    def __rich__(self):
        from rich.text import Text  # plain text: file names may contain [markup]

        elapsed = int(time.monotonic() - self.start)
        return Text(f"{self.title} {elapsed // 60}:{elapsed % 60:02d}  {self.current}")

    def _elapsed(self) -> str:
        elapsed = int(time.monotonic() - self.start)
        return f"{elapsed // 60}:{elapsed % 60:02d}"

    def __enter__(self) -> "_Progress":
        if sys.stderr.isatty():
            from rich.console import Console

            self._status = Console(stderr=True).status(self)
            self._status.__enter__()
        else:
            line = f"pyvmm: {self.title[0].lower()}{self.title[1:]}"
            if self.estimate:
                line += f", {self.estimate}"
            if self.log is not None:
                line += f"; log: {self.log}"
            print(line, file=sys.stderr, flush=True)
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(exc_type, *exc)
            return
        what = f"{self.title[0].lower()}{self.title[1:]}"
        if exc_type is None:
            print(f"pyvmm: done {what} in {self._elapsed()}", file=sys.stderr, flush=True)
        else:
            print(f"pyvmm: {what} failed after {self._elapsed()}", file=sys.stderr, flush=True)

    def step(self, text: str) -> None:
        self.current = text


def _kernel_estimate() -> str:
    """About five minutes with 2 CPUs on the hosts this was measured on."""
    minutes = max(1, round(10 / max(1, len(os.sched_getaffinity(0)))))
    return f"about {minutes} minute{'s' if minutes > 1 else ''} with {len(os.sched_getaffinity(0))} CPUs"


# Kbuild's short log lines: "  CC      kernel/fork.o", "  LD      vmlinux", ...
_KBUILD_STEP_RE = re.compile(r"^\s{2}([A-Z][A-Z0-9_]*)\s+(\S.*)$")


def _run_logged(cmd: list[str], cwd: Path, log, progress: _Progress, what: str) -> None:
    """Run ``cmd`` with output appended to ``log``; show Kbuild steps as progress.

    Raises:
        GuestBuildError: the command failed (the message names the log file).
    """
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    env = dict(os.environ, LC_ALL="C", KBUILD_BUILD_USER="pyvmm",
               KBUILD_BUILD_HOST="pyvmm")
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace")
    except OSError as e:
        raise GuestBuildError(f"{what}: cannot run {cmd[0]} ({e}); {_SETUP_HINT}") from e
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        log.flush()  # so `tail -f` on the log follows the build
        if m := _KBUILD_STEP_RE.match(line):
            progress.step(f"{m.group(1)} {m.group(2)}")
    log.flush()
    if proc.wait() != 0:
        raise GuestBuildError(f"{what} failed (exit {proc.returncode}); see {log.name}")


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished temporary result directory into place."""
    os.chmod(tmp, 0o755)  # mkdtemp made it private; results are for every user
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # lost a race to an identical result: fine
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(parent: Path, prefix: str) -> None:
    """Remove temporary directories left by an interrupted build (caller holds the
    lock, so nobody else is writing them)."""
    for p in parent.glob(prefix + ".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------


def source_version() -> str:
    """Version of the installed ``linux-source-6.1`` package (part of the cache key).

    Raises:
        GuestBuildError: the package or its tarball is missing.
    """
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    if not out or not SOURCE_TARBALL.is_file():
        raise GuestBuildError(f"{SOURCE_PACKAGE} is not installed ({SOURCE_TARBALL} "
                              f"missing); {_SETUP_HINT}")
    return out


def _patches() -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(PATCHES_DIR.glob("*.patch"))]


def _kernel_artifacts(out: Path) -> KernelBuild:
    return KernelBuild(bzimage=out / "bzImage", vmlinux=out / "vmlinux",
                       system_map=out / "System.map", config=out / "config")


def build_kernel(compression: str = "gzip") -> KernelBuild:
    """Build the default guest kernel (or return the cached build).

    The first build extracts and patches the source and compiles everything (about
    five minutes with 2 CPUs). Another ``compression`` reuses that tree: only the
    configuration's compression choice changes, so ``make`` re-links just the bzImage
    payload (seconds).

    Args:
        compression: bzImage payload compression: gzip (default), bzip2, lzma, xz,
            lz4 or zstd.

    Returns:
        The paths of bzImage, vmlinux, System.map and the final config.

    Raises:
        GuestBuildError: missing host packages, a config option that did not take
            effect, or a failed step (the message names the build log).
    """
    fragment = FRAGMENT_PATH.read_text()
    wanted = effective_fragment(fragment, compression)  # validates compression
    version = source_version()
    patches = _patches()
    key = kernel_cache_key(version, fragment.encode(), patches, compression)
    root = cache_dir()
    out = root / f"kernel-{key}"
    if out.is_dir():
        return _kernel_artifacts(out)

    tree_key = tree_cache_key(version, fragment.encode(), patches)
    tree = root / f"linux-tree-{tree_key}"
    log_path = root / f"kernel-{key}.log"
    with _Progress(f"Building guest kernel ({compression})", _kernel_estimate(),
                   log_path) as progress, \
            _locked(root / f".lock-linux-tree-{tree_key}", progress):
        if out.is_dir():  # built by whoever held the lock before us
            return _kernel_artifacts(out)
        _remove_stale(root, f"kernel-{key}")
        with open(log_path, "w") as log:
            _prepare_tree(tree, patches, log, progress)
            _configure(tree, wanted, log, progress)
            jobs = str(len(os.sched_getaffinity(0)))
            _run_logged(["make", _MAKE_ARCH, f"-j{jobs}", "vmlinux", "bzImage"],
                        tree, log, progress, "kernel build (make vmlinux bzImage)")
        tmp = Path(tempfile.mkdtemp(prefix=f"kernel-{key}.tmp-", dir=root))
        shutil.copy2(tree / "arch/x86/boot/bzImage", tmp / "bzImage")
        shutil.copy2(tree / "vmlinux", tmp / "vmlinux")
        shutil.copy2(tree / "System.map", tmp / "System.map")
        shutil.copy2(tree / ".config", tmp / "config")
        shutil.copy2(log_path, tmp / "build.log")
        _publish(tmp, out)
        log_path.unlink(missing_ok=True)
    return _kernel_artifacts(out)


def _prepare_tree(tree: Path, patches: list[tuple[str, bytes]], log,
                  progress: _Progress) -> None:
    """Extract and patch the source into ``tree`` unless a previous build did."""
    if (tree / _TREE_STAMP).is_file():
        return
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    progress.step(f"extracting {SOURCE_TARBALL.name}")
    _run_logged(["tar", "-xf", str(SOURCE_TARBALL), "--strip-components=1", "-C",
                 str(tree)], tree, log, progress, f"extracting {SOURCE_TARBALL}")
    for name, _ in patches:
        progress.step(f"applying {name}")
        _run_logged(["patch", "-p1", "--forward", "--batch", "-i",
                     str(PATCHES_DIR / name)], tree, log, progress,
                    f"applying patch {name}")
    (tree / _TREE_STAMP).write_text("source extracted and patched\n")


def _configure(tree: Path, wanted: str, log, progress: _Progress) -> None:
    """tinyconfig + ``wanted`` -> olddefconfig, then verify every wanted option.

    The fragment is appended to the tinyconfig ``.config`` (a later line overrides an
    earlier one, which is what scripts/kconfig/merge_config.sh does too) and
    ``olddefconfig`` resolves dependencies. Regenerating the config from scratch on
    every build keeps it a pure function of the inputs; Kbuild only rebuilds what
    depends on symbols whose value changed.
    """
    progress.step("make tinyconfig")
    _run_logged(["make", _MAKE_ARCH, "tinyconfig"], tree, log, progress,
                "make tinyconfig")
    config = tree / ".config"
    config.write_text(config.read_text() + "\n# --- pyvmm fragment ---\n" + wanted)
    progress.step("make olddefconfig")
    _run_logged(["make", _MAKE_ARCH, "olddefconfig"], tree, log, progress,
                "make olddefconfig")
    bad = check_config(wanted, config.read_text())
    if bad:
        log.write("config options that did not take effect:\n  " + "\n  ".join(bad))
        log.write("\n")
        raise GuestBuildError(
            f"kernel config: {len(bad)} option(s) of {FRAGMENT_PATH.name} did not take "
            f"effect ({'; '.join(bad)}); check their dependencies; see {log.name}")


# --------------------------------------------------------------------------------------
# Initramfs
# --------------------------------------------------------------------------------------


def _busybox_path() -> Path:
    return Path(os.environ.get("PYVMM_BUSYBOX") or DEFAULT_BUSYBOX)


def is_static_elf(data: bytes) -> bool:
    """True if ``data`` is a 64-bit little-endian ELF without a PT_INTERP segment
    (i.e. it runs without a dynamic loader, as it must in our initramfs)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def busybox_applets(busybox: Path) -> list[str]:
    """Applet install paths (e.g. ``bin/sh``, ``sbin/poweroff``) of a busybox binary,
    from ``busybox --list-full``."""
    out = subprocess.run([str(busybox), "--list-full"], capture_output=True,
                         text=True, check=True).stdout
    return sorted({line.strip().lstrip("/") for line in out.splitlines()
                   if line.strip()})


def build_initramfs() -> Path:
    """Build the default initramfs (or return the cached one).

    An uncompressed newc cpio (the guest would otherwise spend minutes of interpreted
    ring-0 time inflating it) containing: ``/init`` (guests/initramfs/init), the
    static ``/bin/busybox``, a symlink to it for every applet, ``/bin/pyvmm-agent``
    (guests/agent/agent.c, compiled static with ``$CC``/gcc), and empty mount points.
    Written with ``cpio -o -H newc``; no root needed (no device nodes: the kernel's
    built-in initramfs supplies ``/dev/console`` and /init mounts devtmpfs).

    Returns:
        Path of ``initramfs.cpio`` in the cache.

    Raises:
        GuestBuildError: busybox missing or not static, the agent did not compile,
            or cpio failed.
    """
    busybox = _busybox_path()
    if not busybox.is_file():
        raise GuestBuildError(f"{busybox} not found (Debian package busybox-static); "
                              f"{_SETUP_HINT}")
    bb_data = busybox.read_bytes()
    if not is_static_elf(bb_data):
        raise GuestBuildError(f"{busybox} is not a static x86-64 executable; install "
                              f"busybox-static ({_SETUP_HINT})")
    init_data = INIT_SCRIPT_PATH.read_bytes()
    agent_src = AGENT_SOURCE_PATH.read_bytes()
    cc = _compiler()
    key = initramfs_cache_key(init_data, bb_data, agent_src, cc[1])
    root = cache_dir()
    out = root / f"initramfs-{key}"
    result = out / "initramfs.cpio"
    if result.is_file():
        return result

    with _Progress("Building guest initramfs", "a few seconds") as progress, \
            _locked(root / f".lock-initramfs-{key}", progress):
        if result.is_file():
            return result
        _remove_stale(root, f"initramfs-{key}")
        tmp = Path(tempfile.mkdtemp(prefix=f"initramfs-{key}.tmp-", dir=root))
        stage = tmp / "stage"
        _build_agent(cc[0], stage / AGENT_GUEST_PATH, tmp)  # before the mtimes are fixed
        _stage_initramfs(stage, busybox, init_data)
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        with open(tmp / "initramfs.cpio", "wb") as f:
            proc = subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
                cwd=stage, input=("\n".join(names) + "\n").encode(), stdout=f,
                stderr=subprocess.PIPE)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise GuestBuildError(f"cpio failed: {err[-1] if err else proc.returncode}")
        shutil.rmtree(stage)
        _publish(tmp, out)
    return result


def _compiler() -> tuple[str, str]:
    """The C compiler for the agent and its name + version line (cache key).

    ``$CC`` if set, else musl-gcc (Debian's musl-tools: a static agent of ~30 KiB)
    when installed, else gcc (glibc: ~700 KiB, and every byte of the initramfs is
    copied by interpreted guest code at boot on emulation-only hosts).

    Raises:
        GuestBuildError: no compiler.
    """
    cc = os.environ.get("CC") or ("musl-gcc" if shutil.which("musl-gcc") else "gcc")
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise GuestBuildError(f"cannot run the C compiler {cc!r} to build the guest agent "
                              f"({e}); {_SETUP_HINT}") from e
    return cc, f"{cc}: {(out.splitlines() or [''])[0]}"


def _build_agent(cc: str, dest: Path, workdir: Path) -> None:
    """Compile guests/agent/agent.c into a static, stripped ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [cc, "-static", "-Os", "-s", "-Wall", "-o", str(dest), str(AGENT_SOURCE_PATH)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or [str(proc.returncode)])[-1]
        raise GuestBuildError(f"building the guest agent failed ({' '.join(cmd)}): {err}; "
                              "static linking needs the C library's static archive "
                              f"(libc6-dev); {_SETUP_HINT}")
    if not is_static_elf(dest.read_bytes()):
        raise GuestBuildError(f"{cc} did not produce a static executable for the guest agent")
    dest.chmod(0o755)


def _stage_initramfs(stage: Path, busybox: Path, init_data: bytes) -> None:
    """Lay out the initramfs tree in ``stage`` with fixed modes and mtimes."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp",
              "root", "etc"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, stage / "bin/busybox")
    (stage / "bin/busybox").chmod(0o755)
    (stage / "init").write_bytes(init_data)
    (stage / "init").chmod(0o755)
    for applet in busybox_applets(busybox):
        link = stage / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    (stage / "tmp").chmod(0o1777)
    (stage / "root").chmod(0o700)
    for p in [stage, *stage.rglob("*")]:  # reproducible archive: fixed mtimes
        os.utime(p, (0, 0), follow_symlinks=False)


# --------------------------------------------------------------------------------------
# The default guest
# --------------------------------------------------------------------------------------


def default_guest() -> tuple[Path, Path]:
    """Build (once; cached afterwards) and return ``(vmlinux, initramfs)``: the ELF
    kernel pyvmm boots by default and its uncompressed initramfs (``pyvmm boot``
    adds the command line: vmm.linux.DEFAULT_CMDLINE plus the CPU profile's options).
    Callers on the start-up path use vmm.defaultguest.default_guest, which skips this
    module when nothing changed."""
    return build_kernel().vmlinux, build_initramfs()


def input_files() -> list[str]:
    """Every file whose change may change the default guest (for the manifest of
    vmm.defaultguest): the guest sources, the kernel source tarball, busybox and the
    agent's compiler (and the gcc it may wrap)."""
    files = [FRAGMENT_PATH, *sorted(PATCHES_DIR.glob("*.patch")), INIT_SCRIPT_PATH,
             AGENT_SOURCE_PATH, SOURCE_TARBALL, _busybox_path()]
    cc = os.environ.get("CC") or ("musl-gcc" if shutil.which("musl-gcc") else "gcc")
    for name in (cc, "gcc"):
        found = shutil.which(name)
        if found:
            files.append(Path(found))
    return [str(p) for p in files]


def command_param(command: str) -> str:
    """Kernel command-line parameter that makes /init run ``command`` with ``sh -c``,
    print ``pyvmm: exit <status>`` and shut down, e.g. ``pyvmm.cmd=ZWNobyBoaQ==``."""
    return f"{CMD_PARAM}={base64.b64encode(command.encode()).decode()}"
