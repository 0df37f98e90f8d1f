"""pyvmm build: the Containerfile subset, the per-step cache, RUN inside a guest."""

from __future__ import annotations

import json

import pytest

from tests.image.conftest import busybox_layer, entry, make_image, pyvmm, stat_in_image, tree_listing
from tests.linux.conftest import default_guest, guest_build_prerequisites  # noqa: F401
from vmm.image.containerfile import ContainerfileError, parse, substitute

NO_RUN = """# no guest needed
FROM scratch
ARG DEST=/app
COPY --chown=1000:1000 hello.txt $DEST/hello.txt
COPY sub /opt/sub
ENV A=1 \\
    B="two words"
WORKDIR /app
LABEL org.example=x
CMD ["/bin/true"]
"""


def stored(store, digest):
    return store / ("sha256-" + digest.partition(":")[2])


def test_parse_and_substitute():
    ins = parse(NO_RUN)
    assert [i.name for i in ins] == ["FROM", "ARG", "COPY", "COPY", "ENV", "WORKDIR",
                                     "LABEL", "CMD"]
    assert ins[2].flags == {"chown": "1000:1000"} and ins[2].line == 4
    assert ins[7].exec_form == ["/bin/true"] and ins[4].text == 'A=1  B="two words"'
    assert parse("FROM x\nRUN echo [a\n")[1].exec_form is None       # not JSON: shell form
    assert substitute("$A-${B}-${C:-d}-\\$A", {"A": "1", "B": "2"}) == "1-2-d-$A"
    for text, line in [("RUN x\n", 1), ("FROM x\nFOO bar\n", 2), ("FROM x\n\nCOPY a\n", 3),
                       ("FROM x\nRUN [1]\n", 2), ("FROM x\nENV\n", 2),
                       ("FROM x\nCOPY --from=a b c\n", 2), ("FROM x\nENV =1\n", 2)]:
        with pytest.raises(ContainerfileError, match=f"^Containerfile:{line}: "):
            parse(text)


def test_build_without_run(tmp_path, store_env):
    ctx = tmp_path / "ctx"
    (ctx / "sub").mkdir(parents=True)
    (ctx / "hello.txt").write_text("copied\n")
    (ctx / "sub" / "s").write_text("s\n")
    (ctx / "Containerfile").write_text(NO_RUN)
    r = pyvmm("build", "-t", "built:1", str(ctx))
    assert r.returncode == 0, r.stderr
    image = stored(store_env, r.stdout.strip())
    hello = stat_in_image(image / "rootfs.ext4", "/app/hello.txt")
    assert "User:  1000   Group:  1000" in hello and "Size: 7" in hello
    assert "Type: regular" in stat_in_image(image / "rootfs.ext4", "/opt/sub/s")
    config = json.loads((image / "config.json").read_text())["config"]
    assert config["Env"] == ["A=1", "B=two words"] and config["Cmd"] == ["/bin/true"]
    assert config["WorkingDir"] == "/app" and config["Labels"] == {"org.example": "x"}
    assert json.loads((store_env / "index.json").read_text())["tags"]["built:1"]
    again = pyvmm("build", "-t", "built:1", str(ctx))
    assert again.returncode == 0 and again.stderr.count("--> cached") == 2, again.stderr
    (ctx / "hello.txt").write_text("changed\n")
    changed = pyvmm("build", "-t", "built:1", str(ctx))
    assert changed.returncode == 0 and changed.stderr.count("--> cached") == 0, changed.stderr
    # ENTRYPOINT resets the Cmd inherited from the base image, not one set before it.
    for n, (text, cmd) in enumerate([('ENTRYPOINT ["/bin/echo"]\n', None),
                                     ('CMD ["x"]\nENTRYPOINT ["/bin/echo"]\n', ["x"])]):
        (ctx / f"C{n}").write_text("FROM built:1\n" + text)
        r = pyvmm("build", "-t", f"ep:{n}", "-f", str(ctx / f"C{n}"), str(ctx))
        assert r.returncode == 0, r.stderr
        config = json.loads((stored(store_env, r.stdout.strip()) / "config.json")
                            .read_text())["config"]
        assert config["Entrypoint"] == ["/bin/echo"] and config.get("Cmd") == cmd, config


@pytest.mark.parametrize("text,message", [
    ("FROM scratch\nBOGUS x\n", "Containerfile:2: unknown instruction 'BOGUS'"),
    ("FROM no/such:image\n", "Containerfile:1: no/such:image: no such image"),
    ("FROM scratch\nCOPY ../etc/passwd /x\n", "Containerfile:2: ../etc/passwd: outside"),
    ("FROM scratch\nCOPY missing /x\n", "Containerfile:2: missing: no such file"),
])
def test_build_errors_leave_the_store(tmp_path, store_env, text, message):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(NO_RUN)
    (ctx / "hello.txt").write_text("x")
    (ctx / "sub").mkdir()
    assert pyvmm("build", "-t", "good", str(ctx)).returncode == 0, "setup"
    before = tree_listing(store_env)
    (ctx / "Containerfile").write_text(text)
    r = pyvmm("build", "-t", "bad", str(ctx))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("pyvmm: ") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert tree_listing(store_env) == before


@pytest.mark.linux
@pytest.mark.timeout(1200)
def test_build_run_step(default_guest, tmp_path, store_env):  # noqa: F811
    """RUN in a guest on the image being built: its new file, a deleted file's whiteout,
    an owner it set, a RUN after USER run as that user; a rebuild with nothing changed is all
    cached (no guest: the RUN's output does not appear)."""
    base = make_image(tmp_path, [busybox_layer() + [entry("etc/old", b"base\n")]])
    assert pyvmm("pull", "-q", f"oci:{base}:t").returncode == 0
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "in.txt").write_text("from the context\n")
    (ctx / "Containerfile").write_text(f"""FROM oci:{base}:t
COPY in.txt /srv/in.txt
ENV WHO=builder
WORKDIR /srv
RUN echo "run-output-$WHO"; cat in.txt > made.txt; echo "$WHO" >> made.txt; \\
    rm /etc/old; mkdir /home; touch /home/u; chown 1000:1000 /home/u; \\
    mkdir /home/u.d; chown 1000:1000 /home/u.d
USER 1000:1000
RUN id -u > /home/u.d/uid
CMD ["cat", "/srv/made.txt"]
""")
    r = pyvmm("build", "-t", "withrun:1", str(ctx), timeout=900)
    assert r.returncode == 0, r.stderr
    assert "run-output-builder" in r.stderr
    rootfs = stored(store_env, r.stdout.strip()) / "rootfs.ext4"
    assert "Size: 25" in stat_in_image(rootfs, "/srv/made.txt")
    assert stat_in_image(rootfs, "/etc/old") == ""
    assert "User:  1000   Group:  1000" in stat_in_image(rootfs, "/home/u")
    # A RUN after USER runs as that user: its file is the user's, and says so.
    assert "User:  1000   Group:  1000" in stat_in_image(rootfs, "/home/u.d/uid")
    assert "Size: 5" in stat_in_image(rootfs, "/home/u.d/uid")       # "1000\n"
    again = pyvmm("build", "-t", "withrun:1", str(ctx), timeout=300)
    assert again.returncode == 0 and again.stderr.count("--> cached") == 3, again.stderr
    assert "run-output-builder" not in again.stderr     # the step line has $WHO


def test_diff_layer(tmp_path):
    """New and changed entries, one whiteout per removed subtree, names kept inside the
    root (the tars come from the guest)."""
    import io
    import tarfile

    from vmm.image.build import diff_layer

    def mk(path, entries):
        with tarfile.open(path, "w") as t:
            for name, data in entries:
                ti = tarfile.TarInfo(name)
                if data is None:
                    ti.type = tarfile.DIRTYPE
                    t.addfile(ti)
                else:
                    ti.size = len(data)
                    t.addfile(ti, io.BytesIO(data))
    mk(tmp_path / "b.tar", [("./", None), ("./a", b"1"), ("./d", None), ("./d/x", b"x"),
                            ("./.h", b"h"), ("./same", b"s")])
    mk(tmp_path / "a.tar", [("./", None), ("./a", b"2"), ("./.h", b"h"), ("./same", b"s"),
                            ("./../../evil", b"e")])
    with tarfile.open(fileobj=io.BytesIO(diff_layer(tmp_path / "b.tar", tmp_path / "a.tar"))) as t:
        assert [m.name for m in t] == ["a", "evil", ".wh.d"]
