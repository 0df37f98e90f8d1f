"""What ``pyvmm run --image REF [-- ARGS]`` runs, as ``podman run --rm`` would.

The image's Entrypoint + Cmd (ARGS replace Cmd), its Env (``-e`` on top; PATH and HOME
defaulted as podman does), WorkingDir (``-w`` overrides) and User, resolved to numbers
from the image's own /etc/passwd and /etc/group (read from its ext4 image with
debugfs, no VM needed) and handed to the guest agent as ``PYVMM_USER=UID:GID[:GROUPS]``.
The root filesystem is the stored ext4 image, attached as a copy-on-write disk
(vmm.guest's rootfs): the store is never modified.
"""

from __future__ import annotations

import subprocess

from vmm.errors import UserError

#: podman's (containers/common) default PATH when the image sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RunSpecError(UserError):
    """The image cannot be run as asked (no command, unknown user, ...)."""


class RunSpec:
    """rootfs (path of the ext4 image), argv, env (dict), workdir (str or None)."""

    __slots__ = ("rootfs", "argv", "env", "workdir")

    def __init__(self, rootfs, argv, env, workdir):
        self.rootfs, self.argv, self.env, self.workdir = rootfs, argv, env, workdir


def find_image(ref: str, store=None, pull_missing: bool = True):
    """The stored image ``ref`` names (tag, digest, digest prefix); pulled if absent."""
    from vmm.image.pull import Reference, pull
    from vmm.image.store import Store

    store = store or Store()
    image = store.resolve(ref) or store.resolve(Reference.store_name(ref))
    if image is None:
        try:
            digest = Reference(ref).digest
        except UserError:
            digest = None
        if digest:
            image = store.resolve(digest)
    if image is None:
        if not pull_missing:
            raise RunSpecError(f"{ref}: no such image in the store (pyvmm pull {ref})")
        image = pull(ref, store=store)
    return image


def read_file(ext4, path: str) -> str:
    """``path`` from the ext4 image (debugfs cat), or "" if it is not there."""
    from vmm.image.pull import _tool
    r = subprocess.run([_tool("debugfs"), "-R", f'cat "{path}"', str(ext4)],
                       capture_output=True, text=True, errors="replace")
    return r.stdout if r.returncode == 0 else ""


def _table(text: str, fields: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= fields and not line.startswith("#"):
            rows.append(parts)
    return rows


def resolve_user(user: str, passwd: str, group: str) -> tuple[int, int, list[int], str | None]:
    """uid, gid, supplementary gids and home of an OCI ``config.User`` (config.md:
    ``user``, ``uid``, ``user:group``, ``uid:gid``, ``uid:group``, ``user:gid``)."""
    name, _, grp = user.partition(":")
    users = _table(passwd, 7)
    groups = _table(group, 4)
    entry = next((u for u in users if u[0] == name), None) if not name.isdigit() else \
        next((u for u in users if u[2] == name), None)
    if name.isdigit():
        uid = int(name)
    elif entry is not None and entry[2].isdigit():
        uid = int(entry[2])
    else:
        raise RunSpecError(f"user {name!r}: not in the image's /etc/passwd")
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    if grp:
        if grp.isdigit():
            gid = int(grp)
        else:
            g = next((g for g in groups if g[0] == grp and g[2].isdigit()), None)
            if g is None:
                raise RunSpecError(f"group {grp!r}: not in the image's /etc/group")
            gid = int(g[2])
    extra = []
    if entry is not None and not grp:
        extra = sorted({int(g[2]) for g in groups
                        if g[2].isdigit() and entry[0] in g[3].split(",")} - {gid})
    home = entry[5] if entry is not None and entry[5] else None
    return uid, gid, extra, home


def run_spec(image, args: list[str] | None = None, env: dict[str, str] | None = None,
             workdir: str | None = None, user: str | None = None) -> RunSpec:
    """The command, environment and directory ``podman run --rm IMAGE ARGS`` would use."""
    config = image.config()
    argv = config.command(args)
    if not argv:
        raise RunSpecError(f"image {image.short} has no Entrypoint or Cmd: give a "
                           "command after --")
    environment = config.environment()
    environment.setdefault("PATH", DEFAULT_PATH)
    user = config.user if user is None else user
    home = "/root"
    if user and user not in ("0", "root", "0:0", "root:root"):
        uid, gid, groups, home_dir = resolve_user(
            user, read_file(image.rootfs, "/etc/passwd"), read_file(image.rootfs, "/etc/group"))
        environment["PYVMM_USER"] = f"{uid}:{gid}" + (
            ":" + ",".join(map(str, groups)) if groups else "")
        home = home_dir or "/"
    environment.setdefault("HOME", home)
    environment.update(env or {})
    return RunSpec(image.rootfs, argv, environment, workdir or config.workdir or None)
