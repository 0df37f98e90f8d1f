"""pyvmm run --image: what the image says is what runs (one Linux boot per test), and the
pieces that need no VM (the run spec, User resolution)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.image.conftest import busybox_layer, directory, entry, make_image, pyvmm
from tests.linux.conftest import default_guest, guest_build_prerequisites  # noqa: F401
from vmm.image.run import RunSpecError, resolve_user

PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\nstaff:x:50:app,other\n"

APP_CONFIG = {"entrypoint": ["/bin/sh", "-c"],
              "cmd": 'echo "$GREETING $EXTRA"; pwd; id -u; id -g; id -G; echo "$HOME"; exit 7',
              "env": ["GREETING=hi", "EXTRA=image"], "workingdir": "/srv", "user": "app"}


def app_layers():
    return [busybox_layer() + [
        entry("etc/passwd", PASSWD), entry("etc/group", GROUP), directory("srv"),
        directory("home"), directory("home/app", uid=1000, gid=1000)]]


def test_resolve_user():
    p, g = PASSWD.decode(), GROUP.decode()
    assert resolve_user("app", p, g) == (1000, 1000, [50], "/home/app")
    assert resolve_user("app:staff", p, g) == (1000, 50, [], "/home/app")
    assert resolve_user("1000:7", p, g) == (1000, 7, [], "/home/app")
    assert resolve_user("4242", p, g) == (4242, 0, [], None)
    for bad in ("nobody", "app:wheel"):
        with pytest.raises(RunSpecError):
            resolve_user(bad, p, g)


def test_run_spec(tmp_path, store_env):
    from vmm.image.run import find_image, run_spec
    layout = make_image(tmp_path, app_layers(), config=APP_CONFIG)
    image = find_image(f"oci:{layout}:t")          # pulled: not in the store yet
    spec = run_spec(image, [], {"EXTRA": "cli"}, None)
    assert spec.argv == ["/bin/sh", "-c", APP_CONFIG["cmd"]]
    assert spec.env["GREETING"] == "hi" and spec.env["EXTRA"] == "cli"
    assert spec.env["PYVMM_USER"] == "1000:1000:50" and spec.env["HOME"] == "/home/app"
    assert spec.env["PATH"].startswith("/usr/local/sbin") and spec.workdir == "/srv"
    spec = run_spec(image, ["echo", "x"], {}, "/tmp")
    assert spec.argv == ["/bin/sh", "-c", "echo", "x"] and spec.workdir == "/tmp"
    bare = make_image(tmp_path, [busybox_layer()], tag="bare")
    r = pyvmm("run", "--image", f"oci:{bare}:bare")
    assert r.returncode == 2 and "no Entrypoint or Cmd" in r.stderr, r.stderr
    r = pyvmm("run", "--image", "no/such::ref", "--", "true")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--boot-timeout", "600",
                           *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.linux
@pytest.mark.timeout(700)
def test_run_image_config_honoured(default_guest, tmp_path, store_env):  # noqa: F811
    """Entrypoint + Cmd, Env (-e on top), WorkingDir, User (groups, HOME), exit status."""
    layout = make_image(tmp_path, app_layers(), config=APP_CONFIG)
    assert pyvmm("pull", "-q", f"oci:{layout}:t").returncode == 0
    r = _run("--image", f"oci:{layout}:t", "-e", "EXTRA=there")
    assert r.returncode == 7, r.stdout + r.stderr
    assert r.stdout == "hi there\n/srv\n1000\n1000\n1000 50\n/home/app\n", r.stdout + r.stderr


@pytest.mark.linux
@pytest.mark.timeout(700)
def test_run_image_without_shell(default_guest, tmp_path, store_env):  # noqa: F811
    """An image with no /bin/sh (two copies of static busybox): the arguments after --
    replace Cmd (found in the default PATH), -w sets the directory; not pulled before."""
    bb = open("/bin/busybox", "rb").read()
    layout = make_image(tmp_path, [[directory("bin"), entry("bin/echo", bb, mode=0o755),
                                    entry("bin/pwd", bb, mode=0o755), directory("data")]],
                        config={"cmd": ["/bin/echo", "from", "cmd"]})
    r = _run("--image", f"oci:{layout}:t", "-w", "/data", "--", "pwd")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == "/data\n", r.stdout + r.stderr


@pytest.mark.linux
@pytest.mark.timeout(700)
def test_boot_image_shell(default_guest, tmp_path, store_env):  # noqa: F811
    """pyvmm boot --image: the console shell runs in the image (its files, its /bin/sh);
    the shell's exit powers the guest off (status 0)."""
    import shlex

    pexpect = pytest.importorskip("pexpect")
    from tests.linux.conftest import pyvmm_command
    layout = make_image(tmp_path, [busybox_layer() + [entry("etc/marker", b"in-the-image\n")]])
    assert pyvmm("pull", "-q", f"oci:{layout}:t").returncode == 0
    cmd = " ".join(shlex.quote(a) for a in pyvmm_command())
    child = pexpect.spawn("sh", ["-c", f"{cmd} boot --timeout 600 --image oci:{layout}:t; "
                                       "echo pyvmm-status=$?"],
                          encoding="utf-8", codec_errors="replace", timeout=600)
    out = []
    try:
        child.expect(r"[#$] ", timeout=600)
        child.send("cat /etc/marker; ls /bin/ | wc -l\r")
        child.expect(r"\r\nin-the-image\r\n\s*(\d+)\r\n", timeout=60)
        out.append(child.match.group(1))
        child.send("exit\r")
        child.expect(r"pyvmm-status=(\d+)", timeout=120)
        out.append(child.match.group(1))
    except (pexpect.TIMEOUT, pexpect.EOF) as e:
        pytest.fail(f"{type(e).__name__}: {(child.before or '')[-3000:]}")
    finally:
        child.close(force=True)
    # busybox_layer(): busybox and its 10 applet links (the initramfs has hundreds).
    assert out == ["11", "0"], out
