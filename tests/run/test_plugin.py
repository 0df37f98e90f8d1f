"""The pytest plugin's mechanics, run through pytester with a fake vmm.Guest (no boot):
registration via the entry point, scope sharing, the marker, the /dev/kvm skip and
the console tail in failure reports. tests/run/test_guest_fixture.py uses the real
fixture against a real guest."""

from __future__ import annotations

pytest_plugins = ["pytester"]

FAKE = '''
import pytest, vmm.guest, vmm.pytest_plugin

BOOTS = []

class FakeGuest:
    def __init__(self, **settings):
        self.settings = settings
        self.alive = False
    def start(self):
        BOOTS.append(self.settings)
        self.alive = True
    def run(self, cmd, **kw):
        return vmm.guest.RunResult(0, cmd.encode(), b"")
    def console_tail(self, n=4000):
        return b"Linux version fake\\nkernel says goodbye\\n"
    def close(self):
        self.alive = False

@pytest.fixture(autouse=True, scope="session")
def _fake():
    mp = pytest.MonkeyPatch()
    mp.setattr(vmm.guest, "Guest", FakeGuest)
    mp.setattr(vmm.pytest_plugin, "kvm_unusable", lambda: KVM_WHY)
    yield
    mp.undo()

KVM_WHY = None
'''


def test_fixture_scope_marker_and_console_tail(pytester):
    pytester.makeconftest(FAKE)
    pytester.makepyfile(test_a='''
import pytest
from conftest import BOOTS

def test_one(guest):
    assert guest.run("hi").stdout == b"hi"

def test_two_shares_the_module_guest(guest):
    assert len(BOOTS) == 1

@pytest.mark.pyvmm(mem="512M")
def test_marker_gets_its_own_guest(guest):
    assert guest.settings["mem"] == "512M" and len(BOOTS) == 2

def test_fails(guest):
    assert False, "boom"
''')
    r = pytester.runpytest("-p", "no:cacheprovider")
    r.assert_outcomes(passed=3, failed=1)
    r.stdout.fnmatch_lines(["*pyvmm guest console (tail)*", "*kernel says goodbye*"])


def test_function_scope_from_option_and_ini(pytester, monkeypatch):
    pytester.makeconftest(FAKE)
    pytester.makeini("[pytest]\npyvmm_guest_scope = session\n")
    pytester.makepyfile(test_b='''
from conftest import BOOTS
def test_one(guest): pass
def test_two(guest): assert len(BOOTS) == EXPECTED
''')
    test = pytester.path / "test_b.py"
    test.write_text(test.read_text().replace("EXPECTED", "int(__import__('os').environ['N'])"))
    monkeypatch.setenv("N", "1")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
    monkeypatch.setenv("N", "2")
    pytester.runpytest("-p", "no:cacheprovider", "--pyvmm-scope=function").assert_outcomes(passed=2)


def test_skips_without_kvm(pytester):
    pytester.makeconftest(FAKE.replace("KVM_WHY = None", "KVM_WHY = 'no /dev/kvm on this host'"))
    pytester.makepyfile(test_c="def test_x(guest): pass\n")
    r = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    r.assert_outcomes(skipped=1)
    r.stdout.fnmatch_lines(["*pyvmm guest: no /dev/kvm on this host*"])
