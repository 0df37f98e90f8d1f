"""``pyvmm build``: an image from a Containerfile, RUN steps executed inside a pyvmm guest.

The image is assembled as an OCI layout with umoci (``umoci new`` for FROM scratch, a
copy of the stored image's layout otherwise; ``umoci raw add-layer`` per COPY/RUN;
``umoci config`` for ENV, WORKDIR, USER, ENTRYPOINT, CMD, LABEL), then goes through the
pull pipeline into the store (vmm.image.pull), tagged with the build's name.

RUN: the current state becomes an ext4 image (the pull pipeline's ``layout_to_ext4``),
a default guest boots with it as a copy-on-write root (vmm.guest, ``rootfs=``), and in
the guest, as root, busybox ``tar --numeric-owner`` takes the tree before and after the
command (a second mount of the root disk, so /proc etc. are not in it). The layer is
the difference of the two tars, computed here: entries that are new or changed, and a
whiteout (``.wh.NAME``, OCI layer.md) for each path that went away. It is made here and
not by ``umoci repack`` because umoci can only diff a tree it unpacked itself, and the
guest's tree never leaves the guest as files. busybox tar keeps no xattrs: files a RUN
changes lose theirs.

Cache: each COPY/RUN layer is kept in ``STORE/.build-cache/KEY.tar``, KEY the SHA-256 of
the parent's key, the instruction after substitution, and (COPY) the names, modes and
contents of the copied files; a rebuild whose keys are all cached boots no guest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from vmm.errors import UserError
from vmm.image.containerfile import ContainerfileError, pairs, parse, substitute
from vmm.image.pull import PullError, _read_layout, _rmtree, _run, _tool, layout_to_ext4
from vmm.image.store import Store, write_aside

#: Guest RAM for RUN steps: the two tars of the tree are held in the guest's tmpfs.
BUILD_MEM = "1G"


class BuildError(UserError):
    """A build failed (one line naming the file and line where it can)."""


def _shell(ins) -> list[str]:
    return ins.exec_form if ins.exec_form is not None else ["/bin/sh", "-c", ins.text]


def _copy_layer(context: Path, sources: list[str], dest: str, chown: str | None,
                workdir: str, where: str) -> tuple[bytes, str]:
    """The layer of a COPY (tar bytes) and the digest of what it copies (for the key)."""
    uid = gid = 0
    if chown:
        u, _, g = chown.partition(":")
        if not u.isdigit() or (g and not g.isdigit()):
            raise BuildError(f"{where}: --chown={chown}: numeric UID[:GID] only")
        uid, gid = int(u), int(g or u)
    if not dest.startswith("/"):
        dest = os.path.join(workdir or "/", dest)
    into_dir = dest.endswith("/") or len(sources) > 1
    ctx = context.resolve()
    buf = io.BytesIO()
    h = hashlib.sha256()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(host: Path, name: str) -> None:
            ti = tar.gettarinfo(str(host), arcname=name.lstrip("/"))
            ti.uid, ti.gid, ti.uname, ti.gname = uid, gid, "", ""
            h.update(f"{name}\0{ti.type}\0{ti.mode}\0{ti.linkname}\0".encode())
            if ti.isreg():
                with open(host, "rb") as f:
                    data = f.read()
                h.update(hashlib.sha256(data).digest())
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
        for src in sources:
            host = (ctx / src).resolve()
            if host != ctx and ctx not in host.parents:
                raise BuildError(f"{where}: {src}: outside the build context")
            if not host.exists():
                raise BuildError(f"{where}: {src}: no such file in the build context")
            target = os.path.join(dest, host.name) if into_dir and not host.is_dir() else \
                (dest.rstrip("/") or "/") if host.is_dir() else dest
            if host.is_dir():
                for top, dirs, files in os.walk(host):
                    dirs.sort()
                    rel = os.path.relpath(top, host)
                    base = target if rel == "." else os.path.join(target, rel)
                    if base != "/":
                        add(Path(top), base)
                    for name in sorted(files):
                        add(Path(top) / name, os.path.join(base, name))
            else:
                add(host, target)
    return buf.getvalue(), h.hexdigest()


def _name(name: str) -> str:
    """A tar member's path relative to the root ("" for the root itself)."""
    name = os.path.normpath("/" + name).lstrip("/")
    return "" if name == "." else name


def _index(tar_path: Path) -> dict:
    out = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            name = _name(m.name)
            if not name:
                continue
            digest = b""
            if m.isreg():
                f, h = tar.extractfile(m), hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                digest = h.digest()
            out[name] = ((m.type, m.mode, m.uid, m.gid, m.size, m.mtime, m.linkname,
                          m.devmajor, m.devminor, digest), m)
    return out


def diff_layer(before: Path, after: Path) -> bytes:
    """The layer that turns the tree of tar ``before`` into that of tar ``after``.

    The tars come from the guest, which the RUN command controls: names are made
    relative and ``..``-free here, their size is bounded by the scratch disk they came
    through, and the layer is applied by umoci (made for untrusted layers) later."""
    old = _index(before)
    new = _index(after)
    buf = io.BytesIO()
    with tarfile.open(after) as src, tarfile.open(fileobj=buf, mode="w",
                                                  format=tarfile.PAX_FORMAT) as out:
        for m in src:
            name = _name(m.name)
            if not name:
                continue
            if name in old and old[name][0] == new[name][0]:
                continue
            m.name = name
            if m.islnk():
                m.linkname = _name(m.linkname)
            out.addfile(m, src.extractfile(m) if m.isreg() else None)
        gone = sorted(set(old) - set(new))
        for name in gone:
            parent = os.path.dirname(name)
            if parent and parent in gone:
                continue                  # its directory's whiteout covers it
            ti = tarfile.TarInfo(os.path.join(parent, ".wh." + os.path.basename(name)))
            out.addfile(ti, io.BytesIO(b""))
    return buf.getvalue()


def _run_step(layout: Path, work: Path, argv: list[str], env: dict, workdir: str | None,
              where: str, output, user: str = "") -> bytes:
    """RUN in a guest on the current state of ``layout`` as ``user`` (the USER in
    effect, resolved in the image's /etc/passwd like ``pyvmm run --image``); returns
    the layer."""
    from vmm.guest import OUTSIDE_ROOT, Guest, GuestError
    from vmm.image.run import RunSpecError, read_file, resolve_user

    _, manifest = _read_layout(layout)
    ext4 = work / "run.ext4"
    (work / "unpack").mkdir()
    layout_to_ext4(layout, manifest, work / "unpack", ext4)
    _rmtree(work / "unpack")
    env = dict(env)
    if user and user not in ("0", "root", "0:0", "root:root"):
        try:
            uid, gid, groups, home = resolve_user(user, read_file(ext4, "/etc/passwd"),
                                                  read_file(ext4, "/etc/group"))
        except RunSpecError as e:
            raise BuildError(f"{where}: USER {e}") from None
        env["PYVMM_USER"] = f"{uid}:{gid}" + (":" + ",".join(map(str, groups)) if groups else "")
        env.setdefault("HOME", home or "/")
    tree = ("mkdir -p /run/pyvmm-tree && mount /dev/vda /run/pyvmm-tree && "
            "tar -c --numeric-owner -f /rootfs/tmp/.pyvmm-{0}.tar -C /run/pyvmm-tree . ; s=$?; "
            "umount /run/pyvmm-tree; exit $s")
    size = ext4.stat().st_size
    # Started from the snapshot cache like any disposable guest: the disks go into its
    # empty drives after the restore (vmm/disk/empty.py), no boot per RUN step.
    with Guest(rootfs=ext4, mem=BUILD_MEM, scratch_size=max(64 << 20, 3 * size)) as g:
        try:
            g.run(tree.format("before"), env=OUTSIDE_ROOT).check()
            r = g.run(argv, env=env, workdir=workdir, stdout=output, stderr=output)
            if r.exit_code != 0:
                raise BuildError(f"{where}: RUN exited with status {r.exit_code}")
            g.run("sync; " + tree.format("after"), env=OUTSIDE_ROOT).check()
            # copy_out's paths are inside the root: its /tmp is the tmpfs init mounted
            # on /rootfs/tmp (not in the second mount the tars are taken from).
            g.copy_out("/tmp/.pyvmm-before.tar", work / "before.tar")
            g.copy_out("/tmp/.pyvmm-after.tar", work / "after.tar")
        except GuestError as e:
            raise BuildError(f"{where}: RUN: {e}") from None
    layer = diff_layer(work / "before.tar", work / "after.tar")
    for name in ("before.tar", "after.tar", "run.ext4"):
        (work / name).unlink(missing_ok=True)
    return layer


def build(containerfile: str, context: str, tag: str, store: Store | None = None,
          output=None, say=None):
    """Build ``containerfile`` with ``context`` into ``store`` as ``tag``.

    Args:
        output: called with the RUN steps' output bytes (default: discarded).
        say: called with one line per step (``STEP 2/5: RUN ...``, ``--> cached``).
    Returns:
        The stored image (vmm.image.store.Image).
    Raises:
        ContainerfileError, BuildError, PullError, StoreError: one line for the user.
    """
    from vmm.image.pull import pull
    from vmm.image.run import find_image

    store = store or Store()
    say = say or (lambda line: None)
    path = Path(containerfile)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ContainerfileError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    instructions = parse(text, str(path))
    umoci = _tool("umoci")
    cache = store.root / ".build-cache"
    cache.mkdir(parents=True, exist_ok=True)
    staging = store.staging()
    layout = staging / "oci"
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    workdir = ""
    user = ""
    cmd_set = False
    key = ""
    try:
        for n, ins in enumerate(instructions, 1):
            where = f"{path}:{ins.line}"
            variables = {**args, **env}
            text = substitute(ins.text, variables) if ins.name in ("FROM", "COPY", "ADD",
                                                                   "WORKDIR", "USER") else ins.text
            say(f"STEP {n}/{len(instructions)}: {ins.name} {text}")
            if ins.name == "ARG":
                name, _, default = text.partition("=")
                args[name.strip()] = substitute(default, variables)
                continue
            if ins.name == "FROM":
                if layout.exists():
                    raise BuildError(f"{where}: one FROM only (no multi-stage builds)")
                if text == "scratch":
                    subprocess.run([umoci, "init", "--layout", str(layout)], check=True,
                                   capture_output=True)
                    subprocess.run([umoci, "new", "--image", f"{layout}:img"], check=True,
                                   capture_output=True)
                    key = hashlib.sha256(b"scratch").hexdigest()
                else:
                    try:
                        base = find_image(text, store, pull_missing=False)
                    except UserError as e:
                        raise BuildError(f"{where}: {e}") from None
                    if not (base.path / "oci" / "index.json").is_file():
                        raise BuildError(f"{where}: {text}: stored without its OCI layout; "
                                         "pull it again")
                    shutil.copytree(base.path / "oci", layout)
                    key = hashlib.sha256(base.digest.encode()).hexdigest()
                    cfg = base.config()
                    env.update(cfg.environment())
                    workdir = cfg.workdir
                    user = cfg.user or ""
                continue
            if not layout.exists():
                raise BuildError(f"{where}: {ins.name} before FROM")
            config_args = []
            if ins.name in ("ENV", "LABEL"):
                for k, v in pairs(text if ins.name == "LABEL" else ins.text, where, ins.name):
                    v = substitute(v, {**args, **env}) if ins.name == "ENV" else v
                    if ins.name == "ENV":
                        env[k] = v
                    config_args += [f"--config.{ins.name.lower()}", f"{k}={v}"]
            elif ins.name == "WORKDIR":
                workdir = os.path.normpath(os.path.join(workdir or "/", text))
                config_args = ["--config.workingdir", workdir]
            elif ins.name == "USER":
                user = text     # the user later RUN steps run as, too
                config_args = ["--config.user", text]
            elif ins.name in ("ENTRYPOINT", "CMD"):
                argv = _shell(ins) if ins.text else []
                opt = f"--config.{ins.name.lower()}"
                config_args = [x for a in argv for x in (opt, a)] or [f"--clear=config.{ins.name.lower()}"]
                if ins.name == "CMD":
                    cmd_set = True
                elif not cmd_set:
                    # Docker's rule: ENTRYPOINT resets a CMD inherited from the base image
                    # (one set earlier in this Containerfile stays).
                    config_args.append("--clear=config.cmd")
            if config_args:
                key = hashlib.sha256(f"{key}\0{ins.name}\0{json.dumps(config_args)}".encode()).hexdigest()
                _run([umoci, "config", "--image", f"{layout}:img", *config_args],
                     f"{where}: {ins.name}")
                continue
            # COPY / ADD / RUN: a layer, cached by key.
            if ins.name in ("COPY", "ADD"):
                words = text.split()
                layer, content = _copy_layer(Path(context), words[:-1], words[-1],
                                             ins.flags.get("chown"), workdir, where)
                key = hashlib.sha256(f"{key}\0COPY\0{text}\0{ins.flags}\0{content}".encode()).hexdigest()
                cached = cache / f"{key}.tar"
                if not cached.exists():
                    write_aside(cached, layer)
                else:
                    say("--> cached")
            else:
                argv = _shell(ins)
                key = hashlib.sha256(f"{key}\0RUN\0{json.dumps(argv)}\0{json.dumps(env, sort_keys=True)}\0{workdir}\0{user}".encode()).hexdigest()
                cached = cache / f"{key}.tar"
                if cached.exists():
                    say("--> cached")
                else:
                    run_env = {**args, **env}
                    run_env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                       "/usr/bin:/sbin:/bin")
                    layer = _run_step(layout, staging, argv, run_env, workdir or None, where,
                                      output or (lambda d: None), user)
                    write_aside(cached, layer)
            _run([umoci, "raw", "add-layer", "--image", f"{layout}:img", str(cached)],
                 f"{where}: {ins.name}")
        return pull(f"oci:{layout}:img", store=store, quiet=True, name=tag)
    except (ContainerfileError, BuildError, PullError):
        raise
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{path}: {e.cmd[0]} failed: "
                         f"{(e.stderr or b'').decode(errors='replace').strip()[-300:]}") from None
    finally:
        _rmtree(staging)
