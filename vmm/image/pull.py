"""``pyvmm pull``: an OCI image from a registry or a file, into the store as an ext4 image.

The pipeline, each step a maintained tool:
  1. fetch: ``skopeo copy SRC oci:STAGING/oci:img`` (docker://, oci:, oci-archive:,
     docker-archive:); skopeo checks every blob against its digest;
  2. unpack: ``umoci raw unpack --rootless`` applies the layers (whiteouts, opaque
     directories: OCI image-spec "layer.md") into a directory. Rootless, so root and
     unprivileged users get the same result: umoci records each file's owner in the
     ``user.rootlesscontainers`` xattr (a protobuf: 1 = uid, 2 = gid; absent = 0:0)
     and leaves an empty file where the image has a device node;
  3. image: ``mkfs.ext4 -d`` copies the tree (modes, setuid, symlinks, hard links,
     xattrs, times);
  4. fix-up: ``debugfs -w`` gives every inode the owner the image says, drops the
     rootlesscontainers xattr, and makes the device nodes (read from the layers' tar
     headers, with later layers' whiteouts applied);
  5. commit: the staged image directory (the ext4 image, the config, and the OCI layout
     as pulled, for ``pyvmm push``) is renamed into the store (vmm.image.store).
A failure anywhere removes the staging directory: the store is as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from vmm.errors import HostError, UserError
from vmm.image.store import Store

TRANSPORTS = ("docker://", "oci:", "oci-archive:", "docker-archive:")
ROOTLESS_XATTR = "user.rootlesscontainers"
#: distribution/reference's grammar (reference.go), compacted: [domain/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
DOCKER_REF_RE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


class PullError(UserError):
    """A pull failed: bad reference, unreachable registry, corrupt image (one line)."""


class Reference:
    """An image reference: what skopeo gets, and the name the store tags it with.

    Attributes:
        source: the skopeo source (``docker://...``, ``oci:...``, ...).
        name: the tag index name (``host/repo:tag``; the reference as given for a file
            transport), or None for a pull by digest.
        digest: the ``sha256:...`` the reference names, if it does.
    """

    def __init__(self, text: str):
        if not text or any(c.isspace() for c in text):
            raise PullError(f"{text!r}: not an image reference")
        self.digest = None
        if text.startswith(TRANSPORTS[1:]):
            self.source = self.name = text
            if not text.partition(":")[2]:
                raise PullError(f"{text!r}: no path after the transport")
            return
        ref = text[len("docker://"):] if text.startswith("docker://") else text
        m = DOCKER_REF_RE.match(ref)
        if not m:
            raise PullError(f"{text!r}: not a valid image reference "
                            "(expected [HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST], "
                            "or oci:, oci-archive:, docker-archive: PATH)")
        self.digest = m.group("digest")
        if m.group("tag") is None and self.digest is None:
            ref += ":latest"
        self.source = "docker://" + ref
        self.name = None if m.group("tag") is None and self.digest else \
            ref.partition("@")[0]

    @staticmethod
    def store_name(text: str) -> str:
        """The name ``text`` is stored under (for lookups: ``run --image``, ``rmi``)."""
        try:
            r = Reference(text)
        except PullError:
            return text
        return r.name or text


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}")
                                       if os.path.exists(p)), None)
    if path is None:
        raise HostError(f"{name} not found: install it (scripts/setup-host.sh)")
    return path


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "failed"
    line = lines[-1]
    m = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)  # skopeo's logrus format
    return (m.group(1).replace('\\"', '"') if m else line)[:400]


class _Progress:
    """rich progress on stderr for the pull's steps; silent when stderr is not a terminal."""

    def __init__(self, quiet: bool | None = None):
        import sys
        self.quiet = not sys.stderr.isatty() if quiet is None else quiet
        self._progress = None

    def __enter__(self):
        if not self.quiet:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                      TimeElapsedColumn(), console=Console(stderr=True),
                                      transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def step(self, description: str):
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=None)

    def update(self, task, description: str | None = None, done: bool = False) -> None:
        if self._progress is None or task is None:
            return
        if description is not None:
            self._progress.update(task, description=description)
        if done:
            self._progress.update(task, total=1, completed=1)


def _run(cmd: list[str], what: str, progress: _Progress | None = None, task=None,
         label: str = "") -> str:
    """Run ``cmd``; stdout lines update the progress line; raises PullError on failure."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if progress is not None and line.strip():
                progress.update(task, f"{label}: {line.strip()[:70]}")
        stderr = proc.stderr.read()
    finally:
        proc.stdout.close()
        proc.stderr.close()
        rc = proc.wait()
    if rc != 0:
        raise PullError(f"{what}: {_last_line(stderr or ''.join(out))}")
    return stderr


# -- reading the OCI layout ------------------------------------------------------------

def _blob(layout: Path, digest: str) -> Path:
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise PullError(f"image has a malformed digest {str(digest)[:80]!r}")
    return layout / "blobs" / "sha256" / digest[7:]


def _read_layout(layout: Path):
    """(manifest digest, manifest dict) of the one image skopeo wrote (image-layout.md)."""
    try:
        index = json.loads((layout / "index.json").read_bytes())
        desc = index["manifests"][0]
        manifest = json.loads(_blob(layout, desc["digest"]).read_bytes())
        if not isinstance(manifest.get("layers"), list) or "digest" not in manifest["config"]:
            raise KeyError("layers")
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise PullError(f"image layout unreadable: {e}") from None
    return desc["digest"], manifest


def _layer_reader(path: Path):
    """A readable stream of the uncompressed tar of one layer blob (by magic bytes)."""
    f = open(path, "rb")
    head = f.read(4)
    f.seek(0)
    if head[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(f, closefd=True)
    return f


def device_nodes(layout: Path, layers: list[dict]) -> dict[str, tuple]:
    """The device nodes of the image, by path: ``(kind 'c'|'b', major, minor, mode, uid,
    gid)``, from the layers' tar headers in order, with each layer's whiteouts (``.wh.X``)
    and opaque markers (``.wh..wh..opq``) applied to the layers below it (layer.md
    "Whiteouts"). umoci --rootless cannot make these; debugfs does afterwards."""
    import tarfile
    devices: dict[str, tuple] = {}
    for desc in layers:
        added, gone, opaque = {}, [], []
        with _layer_reader(_blob(layout, desc.get("digest"))) as raw, \
                tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                name = os.path.normpath("/" + member.name).lstrip("/")
                base = os.path.basename(name)
                parent = os.path.dirname(name)
                if base == ".wh..wh..opq":
                    opaque.append(parent)
                elif base.startswith(".wh."):
                    gone.append(os.path.join(parent, base[4:]))
                elif member.ischr() or member.isblk():
                    added[name] = ("c" if member.ischr() else "b", member.devmajor,
                                   member.devminor, member.mode & 0o7777, member.uid,
                                   member.gid)
                else:
                    gone.append(name)   # replaced by something that is not a device
        for path in list(devices):
            if any(path == g or path.startswith(g + "/") for g in gone) or \
                    any(path.startswith(d + "/") if d else True for d in opaque):
                del devices[path]
        devices.update(added)
    return devices


# -- ownership fix-up ------------------------------------------------------------------

def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(data) and shift < 64:
        b = data[i]
        value |= (b & 0x7f) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7
    raise ValueError("truncated varint")


def rootless_owner(xattr: bytes | None) -> tuple[int, int]:
    """uid, gid from umoci's ``user.rootlesscontainers`` xattr (rootlesscontainers.proto:
    ``message Resource { uint32 uid = 1; uint32 gid = 2; }``); no xattr means 0:0."""
    uid = gid = 0
    if not xattr:
        return uid, gid
    i = 0
    while i < len(xattr):
        key, i = _varint(xattr, i)
        if key & 7 != 0:            # only varint fields are defined
            raise ValueError(f"unexpected wire type {key & 7}")
        value, i = _varint(xattr, i)
        if key >> 3 == 1:
            uid = value
        elif key >> 3 == 2:
            gid = value
    return uid, gid


def _quote(path: str) -> str:
    # debugfs's parser (libss) takes "..." for words with spaces; a quote or newline in a
    # name cannot be written there.
    if '"' in path or "\n" in path or "\\" in path:
        raise PullError(f"file name {path!r} in the image: quotes, backslashes and "
                        "newlines in names are not supported")
    return f'"{path}"'


def fixup_script(rootfs: Path, devices: dict[str, tuple]) -> tuple[list[str], int, int]:
    """The debugfs commands that give ``rootfs``'s copy in ext4 the image's owners and
    device nodes; also the tree's size in bytes and its inode count (for mkfs)."""
    cmds, seen = [], set()
    size = inodes = 0
    for top, dirs, files in os.walk(rootfs):
        for name in [None] + dirs + files:
            if name is None and top != str(rootfs):
                continue
            host = os.path.join(top, name) if name else top
            st = os.lstat(host)
            inodes += 1
            size += (st.st_size + 4095) // 4096 * 4096
            rel = "/" + os.path.relpath(host, rootfs) if name else "/"
            if rel == "/.":
                rel = "/"
            if (st.st_dev, st.st_ino) in seen:
                continue                  # a hard link: the inode is already done
            seen.add((st.st_dev, st.st_ino))
            try:
                xattr = os.getxattr(host, ROOTLESS_XATTR, follow_symlinks=False)
            except OSError:
                xattr = None
            try:
                uid, gid = rootless_owner(xattr)
            except ValueError as e:
                raise PullError(f"{rel}: bad {ROOTLESS_XATTR} xattr from umoci: {e}") from None
            dev = devices.get(rel.lstrip("/"))
            q = None
            if dev is not None and os.path.isfile(host) and st.st_size == 0:
                q = _quote(rel)
                kind, major, minor, mode, duid, dgid = dev
                cmds += [f"rm {q}", f"cd {_quote(os.path.dirname(rel))}",
                         f"mknod {_quote(os.path.basename(rel))} {kind} {major} {minor}",
                         "cd /",
                         f"sif {q} mode 0{(0o20000 if kind == 'c' else 0o60000) | mode:o}"]
                uid, gid, xattr = duid, dgid, None
            # mkfs.ext4 -d copied the host owner (the root directory: root_owner=0:0).
            have = (0, 0) if rel == "/" else (st.st_uid, st.st_gid)
            if (uid, gid) != have or dev is not None:
                q = q or _quote(rel)
                cmds += [f"sif {q} uid {uid}", f"sif {q} gid {gid}"]
            if xattr is not None:
                cmds.append(f"ea_rm {q or _quote(rel)} {ROOTLESS_XATTR}")
    return cmds, size, inodes


def _debugfs(image: Path, cmds: list[str]) -> None:
    if not cmds:
        return
    r = subprocess.run([_tool("debugfs"), "-w", "-f", "-", str(image)],
                       input="\n".join(cmds) + "\n", capture_output=True, text=True,
                       errors="replace")
    # debugfs exits 0 even when a command fails; its complaints are on stderr.
    errors = [ln for ln in r.stderr.splitlines()
              if ln.strip() and not ln.startswith("debugfs ")]
    if r.returncode != 0 or errors:
        raise PullError(f"debugfs fix-up of {image.name} failed: "
                        f"{(errors or [r.stderr.strip() or 'failed'])[0]}")


def _rmtree(path: Path) -> None:
    def onerror(func, p, exc):   # a read-only directory from the image: make it writable
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)


def layout_to_ext4(layout: Path, manifest: dict, work: Path, ext4: Path,
                   progress: "_Progress | None" = None, ref: str = "image") -> int:
    """Steps 2-4 of a pull: the image in ``layout`` as the ext4 image ``ext4`` (unpacked
    in ``work``, which the caller removes). Returns the tree's size in bytes."""
    from vmm.images import make_ext4
    progress = progress or _Progress(quiet=True)
    task = progress.step("unpack layers")
    unpack_from = layout
    if any("zstd" in str(layer.get("mediaType", "")) for layer in manifest["layers"]):
        # umoci 0.4.7 applies gzip and plain tar layers only: recompress a copy
        # for unpacking; the store keeps the image (and its digest) as pulled.
        unpack_from = work / "gzip"
        progress.update(task, "unpack: recompressing zstd layers for umoci")
        _run([_tool("skopeo"), "copy", "-q", "--dest-compress",
              "--dest-compress-format", "gzip", f"oci:{layout}:img",
              f"oci:{unpack_from}:img"], f"pull {ref}: recompress", progress, task, "unpack")
    # raw unpack: the rootfs alone, without the bundle's mtree manifest (which
    # hashes every file: most of umoci unpack's time, and pyvmm never repacks).
    rootfs = work / "rootfs"
    _run([_tool("umoci"), "raw", "unpack", "--rootless", "--image", f"{unpack_from}:img",
          str(rootfs)], f"pull {ref}: unpack", progress, task, "unpack")
    devices = device_nodes(layout, manifest["layers"])
    progress.update(task, "unpack layers", done=True)

    task = progress.step("make ext4 image")
    cmds, size, inodes = fixup_script(rootfs, devices)
    image_size = max(16 << 20, int(size * 1.25) + inodes * 256 + (16 << 20))
    make_ext4(rootfs, ext4, image_size, inodes=max(4096, inodes + inodes // 4 + 256))
    _debugfs(ext4, cmds)
    progress.update(task, "make ext4 image", done=True)
    return size


def pull(ref: str, store: Store | None = None, tls_verify: bool = True,
         quiet: bool | None = None, name: str | None = None):
    """Pull ``ref`` into ``store`` (tagged ``name``, default the reference's own name);
    returns the stored vmm.image.store.Image.

    Raises:
        PullError: bad reference, unreachable registry, corrupt or unsupported image
            (the store is unchanged).
        HostError: skopeo, umoci or e2fsprogs missing.
    """
    from vmm.image.config import ImageConfig

    reference = Reference(ref)
    store = store or Store()
    tools = {t: _tool(t) for t in ("skopeo", "umoci", "mkfs.ext4", "debugfs")}
    staging = store.staging()
    try:
        with _Progress(quiet) as progress:
            layout = staging / "oci"
            task = progress.step(f"fetch {ref}")
            cmd = [tools["skopeo"], "copy", "--override-os", "linux", "--override-arch", "amd64"]
            if not tls_verify:
                cmd.append("--src-tls-verify=false")
            _run([*cmd, reference.source, f"oci:{layout}:img"], f"pull {ref}", progress,
                 task, "fetch")
            progress.update(task, f"fetch {ref}", done=True)
            digest, manifest = _read_layout(layout)
            if reference.digest and manifest.get("mediaType", "").endswith("oci.image.manifest.v1+json") \
                    and digest != reference.digest:
                raise PullError(f"pull {ref}: got manifest {digest}, not the digest asked for")
            config_blob = _blob(layout, manifest["config"]["digest"]).read_bytes()
            config = ImageConfig.from_json(config_blob)
            if config.architecture not in ("", "amd64") or config.os not in ("", "linux"):
                raise PullError(f"pull {ref}: image is {config.os}/{config.architecture}, "
                                "pyvmm runs linux/amd64")

            out = staging / "image"
            out.mkdir()
            size = layout_to_ext4(layout, manifest, staging, out / "rootfs.ext4", progress, ref)

            # The OCI layout too (blobs as pulled, compressed): pyvmm push sends it as is.
            os.rename(layout, out / "oci")
            (out / "config.json").write_bytes(config_blob)
            (out / "info.json").write_text(json.dumps({
                "digest": digest, "size": size, "created": config.created,
                "source": ref}, indent=1) + "\n")
            tag = name or reference.name
            return store.commit(out, digest, [tag] if tag else [])
    finally:
        _rmtree(staging)
