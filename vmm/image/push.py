"""``pyvmm push``: a stored image's OCI layout to a registry or file, with skopeo."""

from __future__ import annotations

from vmm.image.pull import PullError, Reference, _run, _tool
from vmm.image.run import find_image


def push(name: str, ref: str, store=None, tls_verify: bool = True) -> str:
    """Copy image ``name`` from the store to ``ref``; returns the pushed manifest digest.

    Raises:
        PullError / StoreError: unknown image, bad reference, the copy failed.
    """
    import os
    import tempfile

    image = find_image(name, store, pull_missing=False)
    layout = image.path / "oci"
    if not (layout / "index.json").is_file():
        raise PullError(f"{name}: stored without its OCI layout (pulled by an older "
                        f"pyvmm): pull it again to push it")
    dest = Reference(ref)
    if dest.digest:
        raise PullError(f"{ref}: a push destination names a tag, not a digest")
    cmd = [_tool("skopeo"), "copy", "-q"]
    if not tls_verify:
        cmd.append("--dest-tls-verify=false")
    fd, digestfile = tempfile.mkstemp(prefix="pyvmm-push-")
    os.close(fd)
    try:
        _run([*cmd, "--digestfile", digestfile, f"oci:{layout}:img", dest.source],
             f"push {name} to {ref}")
        with open(digestfile) as f:
            return f.read().strip()
    finally:
        os.unlink(digestfile)
