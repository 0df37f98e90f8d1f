"""``--net tap=NAME``: a Linux TAP device with vnet headers (needs root or CAP_NET_ADMIN).

The device is opened (or created, if absent: then it disappears when pyvmm closes it)
through /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a 12-byte header
(TUNSETVNETHDRSZ: the size of virtio 1.x's virtio_net_hdr). No offloads are enabled
(TUNSETOFFLOAD is not called), so every header the kernel gives is all zeros but
num_buffers; the device model writes its own, and frames cross here without one.
Bringing the interface up and addressing it are the host's business (``ip link set
NAME up``), as with QEMU.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from vmm.net.base import MAX_FRAME, RECEIVE_BATCH, NetBackend, NetError

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
#: virtio_net_hdr_v1 (virtio 1.2 §5.1.6).
VNET_HDR_SIZE = 12
_ZERO_HDR = bytes(VNET_HDR_SIZE)
TUN_PATH = "/dev/net/tun"


class TapBackend(NetBackend):
    """An open TAP device ``name``.

    Raises:
        NetError: /dev/net/tun is missing, not permitted (not root / no CAP_NET_ADMIN),
            the name is taken by a non-TAP interface or busy.
    """

    name = "tap"

    def __init__(self, name: str):
        self.ifname = name
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise NetError(f"--net tap={name}: cannot open {TUN_PATH}: {e.strerror}") from None
        self.fd = fd
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                fcntl.ioctl(fd, TUNSETIFF, ifr)
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            except OSError as e:
                hint = {errno.EPERM: " (needs root or CAP_NET_ADMIN)",
                        errno.EBUSY: " (in use by another process)",
                        errno.EINVAL: " (an interface of that name that is not a TAP?)"}
                raise NetError(f"--net tap={name}: cannot open the TAP device: "
                               f"{e.strerror}{hint.get(e.errno, '')}") from None
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self.fd

    def receive(self) -> list[bytes]:
        frames = []
        read = os.read
        for _ in range(RECEIVE_BATCH):
            try:
                data = read(self.fd, VNET_HDR_SIZE + MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == errno.EIO:  # the interface is down: nothing to read
                    break
                raise
            if len(data) <= VNET_HDR_SIZE or len(data) > VNET_HDR_SIZE + MAX_FRAME:
                continue  # cannot happen with MTU <= 64 KiB; never handed on
            frames.append(data[VNET_HDR_SIZE:])
        return frames

    def send(self, pieces: list) -> None:
        try:
            os.writev(self.fd, [_ZERO_HDR, *pieces])
        except BlockingIOError:
            pass  # the interface's queue is full: the frame is lost, as on a wire
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: the interface is down (frame lost)
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
