"""Device state as plain data, for snapshot/restore, and the checks a restore makes.

Every stateful device model has ``save() -> dict`` and ``restore(state) -> None``
(STYLE.md habit 10; Firecracker's ``persist.rs``, vm-superio's ``Serial::from_state``,
vm-virtio's ``QueueState``):

* ``save()`` returns what the device keeps as plain data: int, bool, str, bytes, None,
  lists and dicts with str keys (the snapshot format layer writes it as JSON, bytes
  base64-encoded), with ``"v"``, the layout's version. What is derived from the state
  (an interrupt line, a status register read, LSR bits) is not in it: it is computed
  again from the restored state.
* ``restore(state)`` is applied to a freshly constructed device -- built with the same
  arguments and callbacks as the one that was saved (the machine rebuilds the hardware,
  then restores each device). A state comes from a snapshot file, which is untrusted
  input: ``restore`` checks every value it takes (type, range, consistency) before it
  changes anything, and raises :class:`DeviceStateError` (one line) otherwise, leaving
  the device as it was.

The helpers below are those checks; each names the device and the key it refused.
This module imports nothing but vmm.errors (the legacy devices are on the start-up path).
"""

from __future__ import annotations

from vmm.errors import UserError

__all__ = ["DeviceStateError", "STATE_VERSION", "fields", "uint", "flag", "blob"]

#: The version of every state layout in vmm/devices (``state["v"]``).
STATE_VERSION = 1

U8_MAX = 0xFF
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


class DeviceStateError(UserError, ValueError):
    """A device state that cannot be restored (a corrupt or foreign snapshot)."""


def fields(state: object, what: str, keys: tuple[str, ...], *,
           version: int | None = STATE_VERSION) -> dict:
    """Check that ``state`` is a dict with exactly ``keys`` (plus ``"v"`` when
    ``version`` is not None, which must equal it); returns it.

    Raises:
        DeviceStateError: not a dict, a missing or unknown key, another version.
    """
    if not isinstance(state, dict):
        raise DeviceStateError(f"{what} state is a {type(state).__name__}, not a dict")
    want = set(keys)
    if version is not None:
        want.add("v")
        v = state.get("v")
        if type(v) is not int or v != version:
            raise DeviceStateError(f"{what} state has version {v!r}; this pyvmm reads "
                                   f"version {version}")
    have = set(state)
    if have != want:
        missing, extra = sorted(want - have), sorted(map(str, have - want))
        raise DeviceStateError(f"{what} state: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"unknown {', '.join(extra)}"] if extra else [])))
    return state


def uint(state: dict, key: str, what: str, hi: int, lo: int = 0) -> int:
    """``state[key]``, an int (not a bool) in ``lo..hi``."""
    value = state[key]
    if type(value) is not int:
        raise DeviceStateError(f"{what} state: {key} is a {type(value).__name__}, "
                               "not an int")
    if not lo <= value <= hi:
        raise DeviceStateError(f"{what} state: {key} = {value} is outside {lo}..{hi}")
    return value


def flag(state: dict, key: str, what: str) -> bool:
    """``state[key]``, a bool."""
    value = state[key]
    if type(value) is not bool:
        raise DeviceStateError(f"{what} state: {key} is a {type(value).__name__}, "
                               "not a bool")
    return value


def blob(state: dict, key: str, what: str, max_len: int, *, exact: bool = False) -> bytes:
    """``state[key]``, bytes of at most ``max_len`` (exactly, with ``exact``)."""
    value = state[key]
    if not isinstance(value, (bytes, bytearray)):
        raise DeviceStateError(f"{what} state: {key} is a {type(value).__name__}, "
                               "not bytes")
    if len(value) > max_len or exact and len(value) != max_len:
        bound = "exactly" if exact else "at most"
        raise DeviceStateError(f"{what} state: {key} holds {len(value)} bytes, "
                               f"{bound} {max_len} expected")
    return bytes(value)
