"""Least privilege for the VMM process (issue 14, item 2; docs/security.md).

- :func:`no_new_privs`: PR_SET_NO_NEW_PRIVS, so nothing this process or its children
  exec can gain privileges (set-user-ID binaries, file capabilities); prctl(2).
- :func:`limit_open_files`: the soft RLIMIT_NOFILE lowered to what a VM needs plus a
  margin (:data:`NOFILE_SOFT`), so a leak of fds is an EMFILE, not a host-wide cost.
- :func:`parse_user` / :func:`drop_to`: ``--user UID[:GID]`` when started as root:
  supplementary groups cleared, then the GID, then the UID, and checked that root
  cannot be regained; done once /dev/kvm and the images are open, before guest code runs.
- :func:`set_cloexec`: for the fds pyvmm does not open through Python (those KVM
  ioctls return; Python's own os.open/open/os.pipe/os.eventfd fds are already
  non-inheritable, PEP 446).

Only ctypes (already imported on the boot path by vmm/kvm), os and resource, which are
cheap, are used; all of it is a few system calls.
"""

from __future__ import annotations

import os

from vmm.errors import HostError

PR_SET_NO_NEW_PRIVS = 38   # <linux/prctl.h>
PR_GET_NO_NEW_PRIVS = 39

#: The soft RLIMIT_NOFILE pyvmm runs under. A VM uses ~20 fds per vCPU and disk at
#: most (KVM VM and vCPU fds, ioeventfds, irqfds, disk and overlay fds, the console
#: and terminal pipes); 1024 leaves room for the largest configuration (64 vCPUs, 26
#: disks) and for Python's own files.
NOFILE_SOFT = 1024


class PrivilegeError(HostError):
    """A privilege change failed or could be undone (a VMM error, exit 1)."""


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def no_new_privs() -> None:
    """Set PR_SET_NO_NEW_PRIVS on this process (inherited by threads and children;
    it cannot be cleared). Raises PrivilegeError if the kernel refuses."""
    import ctypes
    libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise PrivilegeError(f"PR_SET_NO_NEW_PRIVS: {os.strerror(e)}")


def no_new_privs_set() -> bool:
    """Whether PR_SET_NO_NEW_PRIVS is set on this process."""
    return _libc().prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1


def limit_open_files(soft: int = NOFILE_SOFT) -> int:
    """Lower the soft RLIMIT_NOFILE to ``soft`` (never raise it, never touch the hard
    limit); returns the soft limit now in force."""
    import resource
    cur, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if cur == resource.RLIM_INFINITY or cur > soft:
        new = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        return new
    return cur


def harden() -> None:
    """What every pyvmm VMM process does first: no_new_privs and limit_open_files."""
    no_new_privs()
    limit_open_files()


def set_cloexec(fd: int) -> int:
    """Make ``fd`` close-on-exec (if it is not already); returns ``fd``."""
    if os.get_inheritable(fd):
        os.set_inheritable(fd, False)
    return fd


def parse_user(text: str) -> tuple[int, int]:
    """``UID[:GID]`` (numbers or names) -> (uid, gid); without GID the user's primary
    group (or GID = UID for a UID not in the password database). Raises ValueError
    with a one-line message."""
    user, sep, group = text.partition(":")
    if not user or (sep and not group):
        raise ValueError(f"--user {text!r}: expected UID[:GID]")
    import pwd
    if user.isdigit():
        uid = int(user)
        try:
            default_gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            default_gid = uid
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"--user {text!r}: no such user") from None
        uid, default_gid = entry.pw_uid, entry.pw_gid
    if not sep:
        gid = default_gid
    elif group.isdigit():
        gid = int(group)
    else:
        import grp
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"--user {text!r}: no such group") from None
    if uid == 0:
        raise ValueError(f"--user {text!r}: give an unprivileged user, not root")
    if uid >= 2**32 - 1 or gid >= 2**32 - 1:
        raise ValueError(f"--user {text!r}: out of range")
    return uid, gid


def check_can_drop() -> None:
    """Raise ValueError (one line) unless this process can change user (is root)."""
    if os.geteuid() != 0:
        raise ValueError("--user needs pyvmm started as root (it is running as uid "
                         f"{os.geteuid()}); without root, just run pyvmm as that user")


def drop_to(uid: int, gid: int) -> None:
    """Become ``uid``:``gid`` for good: no supplementary groups, real, effective and
    saved IDs all changed (setgroups(2), setresgid(2), setresuid(2), in that order:
    after setuid the groups could no longer be changed), then checked that neither
    root's UID nor GID can be taken back. Threads already running keep their IDs only
    where the C library does not broadcast the change; glibc's setres[ug]id do (nptl
    setxid), so call this before the vCPU threads start anyway.

    Raises PrivilegeError if a step fails or root can be regained. Already ``uid``:
    ``gid`` (a VM built again after a reboot): nothing to do.
    """
    if os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid):
        return
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise PrivilegeError(f"dropping privileges to {uid}:{gid}: {e.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) \
            or os.getgroups() not in ([], [gid]):
        raise PrivilegeError(f"dropping privileges to {uid}:{gid}: IDs are now "
                             f"{os.getresuid()}/{os.getresgid()}")
    for regain in (lambda: os.setuid(0), lambda: os.seteuid(0), lambda: os.setgid(0)):
        try:
            regain()
        except PermissionError:
            continue
        raise PrivilegeError(f"dropped to {uid}:{gid}, but root could be regained")
