"""Where pyvmm finds its own files and keeps its caches.

``guests_dir()``: the guest sources (kernel config fragment and patches, the
initramfs's /init, the agent, the bare-metal test guests). A wheel carries them inside
the package as ``vmm/guests/`` (setup.py maps the repository's top-level ``guests/``
there); a source checkout or an editable install has them beside the package, in
``guests/``. Both are paths relative to the package, so an installed pyvmm never looks
at the directory it was started from.

``cache_dir()``: build results (kernel, initramfs, test guests) and cheap verdicts
(the host probe): ``$PYVMM_CACHE``, else ``$XDG_CACHE_HOME/pyvmm``, else
``~/.cache/pyvmm``. Not created here.

Only ``os`` is imported: this module is on every start-up path.
"""

from __future__ import annotations

import os

try:    # CPython's own SHA-256 (3.11: _sha256, 3.12+: _sha2): hashlib would load OpenSSL
    from _sha256 import sha256  # noqa: F401  (~5 ms of every restore)
except ImportError:
    try:
        from _sha2 import sha256  # noqa: F401
    except ImportError:
        from hashlib import sha256  # noqa: F401

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def guests_dir() -> str:
    """The directory holding the guest sources (``linux/``, ``initramfs/``, ``agent/``,
    ``tiny/``, ``probes/``): the installed package's ``vmm/guests`` when it exists,
    else the source tree's ``guests/``."""
    installed = os.path.join(_PACKAGE, "guests")
    if os.path.isdir(installed):
        return installed
    return os.path.join(os.path.dirname(_PACKAGE), "guests")


def cache_dir() -> str:
    """The cache root (see the module docstring)."""
    if os.environ.get("PYVMM_CACHE"):
        return os.path.expanduser(os.environ["PYVMM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.expanduser(xdg), "pyvmm")


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so that a
    reader sees the old content or the new, never half of it."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_records(path: str, records: list[tuple[str, str]]) -> None:
    """Write ``(key, value)`` records as ``key value`` lines, atomically.

    The format of pyvmm's small cache files (the default guest's manifest, the host
    verdict): plain text, read without importing json (~1-3 ms of start-up). A key has
    no whitespace; a value has no newline (paths with one are refused).
    """
    lines = []
    for key, value in records:
        if not key or any(c.isspace() for c in key) or "\n" in value or "\r" in value:
            raise ValueError(f"cannot record {key!r}={value!r}")
        lines.append(f"{key} {value}\n")
    write_atomic(path, "".join(lines).encode())


def read_records(path: str) -> list[tuple[str, str]]:
    """The records of a file written by :func:`write_records`.

    Raises:
        OSError: unreadable. ValueError: not such a file (or not UTF-8).
    """
    with open(path, "rb") as f:
        text = f.read(1 << 20).decode()
    out = []
    for line in text.split("\n")[:-1] if text.endswith("\n") else [None]:
        if line is None:
            raise ValueError(f"{path}: truncated")
        key, sep, value = line.partition(" ")
        if not sep or not key:
            raise ValueError(f"{path}: malformed line {line!r}")
        out.append((key, value))
    return out
