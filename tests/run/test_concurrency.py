"""Four guests at once from four threads: isolated, unmixed outputs; afterwards no
leaked file descriptors, threads or child processes. (4 boots on a 2-core host take
about four times as long as one.)"""

from __future__ import annotations

import threading
import time

import pytest

from tests.run.conftest import child_pids, open_fds

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.timeout(1500)]

N = 4


def test_four_guests_from_threads(guest_ready):
    from vmm import Guest
    import vmm.guest  # noqa: F401 - import first so its module state is not counted

    fds, threads, kids = open_fds(), threading.active_count(), child_pids()
    results, errors = {}, {}

    def worker(i: int) -> None:
        try:
            with Guest(mem="256M", boot_timeout=1200) as g:
                results[i] = [g.run(f"for n in $(seq 1 40); do echo guest-{i}-$n; "
                                    f"echo err-{i}-$n >&2; done; exit {i}"),
                              g.run("head -c 16 /dev/urandom | od -An -tx1")]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[i] = e

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(N)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    boot_ids = set()
    for i in range(N):
        r, ident = results[i]
        assert r.exit_code == i
        assert r.stdout == "".join(f"guest-{i}-{n}\n" for n in range(1, 41)).encode()
        assert r.stderr == "".join(f"err-{i}-{n}\n" for n in range(1, 41)).encode()
        boot_ids.add(ident.stdout)
    # Four different VMs: their RNGs differ (guests restored from one cached snapshot
    # share a boot_id, but the agent reseeds each one's RNG from the host).
    assert len(boot_ids) == N
    deadline = time.monotonic() + 10
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() == threads, threading.enumerate()
    assert open_fds() == fds
    assert child_pids() == kids
