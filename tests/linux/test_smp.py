"""SMP Linux guests: ``--cpus 2`` and ``--cpus 4`` (one boot each; vCPUs beyond the
host's cores make this slower on our 2-core CI hosts)."""

from __future__ import annotations

import re

import pytest

from tests.linux.conftest import BOOT_TIMEOUT_S, run_pyvmm

pytestmark = [pytest.mark.linux, pytest.mark.timeout(3 * BOOT_TIMEOUT_S)]

# Each CPU does some work pinned to it, then CPU 1 (a secondary) powers the guest off.
SCRIPT = """
echo nproc=$(nproc)
echo cpuinfo=$(grep -c ^processor /proc/cpuinfo)
echo online=$(cat /sys/devices/system/cpu/online)
i=0
while [ $i -lt $(nproc) ]; do
  taskset -c $i sh -c 'n=0; while [ $n -lt 200 ]; do n=$((n+1)); done; echo "cpu$0 done $n"' $i
  i=$((i+1))
done
taskset -c 1 sh -c 'sync; poweroff -f'
"""


@pytest.mark.parametrize("cpus", [2, 4])
def test_smp_guest(default_guest, cpus):
    r = run_pyvmm(str(default_guest.vmlinux), "--initrd", str(default_guest.initramfs),
                  "--cpus", str(cpus), command=SCRIPT, timeout=3 * BOOT_TIMEOUT_S - 60)
    out = r.stdout.replace("\r\n", "\n")
    assert r.returncode == 0, r.describe()
    assert f"nproc={cpus}\n" in out and f"cpuinfo={cpus}\n" in out, r.describe()
    assert f"online=0-{cpus - 1}\n" in out
    for i in range(cpus):
        assert f"cpu{i} done 200\n" in out
    # poweroff -f from CPU 1: the kernel halts there, and pyvmm ends the VM cleanly.
    assert re.search(r"reboot: (System halted|Power down)", out)
    assert "pyvmm: exit" not in out          # the script powered off before /init's end
