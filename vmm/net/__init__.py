"""Network backends of the virtio-net card, and the user's spelling of them.

``--net none|user|tap=NAME`` and ``--publish [HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]``
are parsed here (:func:`parse_net`, :func:`parse_publish`) into a
:class:`vmm.config.NetConfig`; :func:`open_backend` makes the backend it names:

* ``none``: no NIC at all (the default; the machine attaches nothing).
* ``user``: Debian's ``passt`` as a child process (passt.py): no root needed.
* ``tap=NAME``: a TAP device with vnet headers (tap.py): root or CAP_NET_ADMIN.

Only this module's names are imported by the CLI; the backends are imported when used.
"""

from __future__ import annotations

from vmm.net.base import NetBackend, NetError

__all__ = ["NetError", "Publish", "parse_net", "parse_publish", "open_backend"]

NET_MODES = ("none", "user", "tap")


class Publish(tuple):
    """One forwarded port: ``(proto, host_addr, host_port, guest_port)``;
    ``host_addr`` is "" for every host address."""

    __slots__ = ()

    def __new__(cls, proto: str, host_addr: str, host_port: int, guest_port: int):
        return tuple.__new__(cls, (proto, host_addr, host_port, guest_port))

    proto = property(lambda self: self[0])
    host_addr = property(lambda self: self[1])
    host_port = property(lambda self: self[2])
    guest_port = property(lambda self: self[3])

    def __str__(self) -> str:
        addr = (f"[{self.host_addr}]:" if ":" in self.host_addr else
                f"{self.host_addr}:") if self.host_addr else ""
        return f"{addr}{self.host_port}:{self.guest_port}/{self.proto}"


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise NetError(f"--publish {spec}: {text!r} is not a port number (1-65535)")
    return int(text)


def parse_publish(spec: str) -> Publish:
    """``[HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]`` -> Publish (IPv6 as ``[::1]:80:80``).

    Raises:
        NetError: malformed (the message names the spec and the expected form).
    """
    form = "[HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]"
    rest, slash, proto = spec.partition("/")
    proto = proto.lower() if slash else "tcp"
    if proto not in ("tcp", "udp"):
        raise NetError(f"--publish {spec}: protocol must be tcp or udp, not {proto!r}")
    addr = ""
    if rest.startswith("["):
        addr, bracket, rest = rest[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise NetError(f"--publish {spec}: expected {form}")
        rest = rest[1:]
    parts = rest.split(":")
    if not addr and len(parts) == 3:
        addr, *parts = parts
        if not addr:
            raise NetError(f"--publish {spec}: empty host address (expected {form})")
    if len(parts) != 2:
        raise NetError(f"--publish {spec}: expected {form}")
    if addr:
        import ipaddress
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise NetError(f"--publish {spec}: {addr!r} is not an IP address") from None
    return Publish(proto, addr, _port(parts[0], spec), _port(parts[1], spec))


def parse_net(spec: str, publish=()):
    """``none``, ``user`` or ``tap=NAME`` (+ the --publish specs) -> NetConfig, or None
    for ``none``.

    Raises:
        NetError: an unknown mode, a bad TAP name, a bad --publish, or --publish with a
            mode that cannot forward (tap: the host reaches the guest directly; none).
    """
    from vmm.config import NetConfig
    mode, eq, arg = spec.partition("=")
    pubs = [p if isinstance(p, Publish) else parse_publish(p) for p in publish]
    if mode == "none" and not eq:
        if pubs:
            raise NetError("--publish needs --net user")
        return None
    if mode == "user" and not eq:
        return NetConfig("user", publish=pubs)
    if mode == "tap":
        if not arg or len(arg.encode()) > 15 or "/" in arg or arg in (".", ".."):
            raise NetError(f"--net {spec}: a TAP device name of 1-15 characters is needed "
                           "(tap=NAME)")
        if pubs:
            raise NetError("--publish works with --net user only (a TAP device is "
                           "reached from the host directly)")
        return NetConfig("tap", tap=arg)
    raise NetError(f"--net {spec}: expected none, user or tap=NAME")


def open_backend(config) -> NetBackend:
    """The backend a NetConfig names, started and ready.

    Raises:
        NetError: passt missing or failing (a port in use), a TAP that cannot be opened.
    """
    if config.mode == "user":
        from vmm.net.passt import PasstBackend
        return PasstBackend(config.mac, config.publish)
    if config.mode == "tap":
        from vmm.net.tap import TapBackend
        return TapBackend(config.tap)
    raise NetError(f"unknown network mode {config.mode!r}")
