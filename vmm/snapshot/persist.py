"""A Machine to a snapshot directory and back (Firecracker's persist.rs, for pyvmm).

What is saved, in ``state``:
    config   what the hardware is built from (kind, memory, vCPUs, CPU profile and host
             quirks, disks, kernel path for diagnostics): a restore rebuilds exactly that
    vm       PIT2, CLOCK and the three irqchips (vmm.arch.x86_64.cpustate.save_vm)
    vcpus    every vCPU's state (cpustate.save_vcpu), Firecracker's order on restore
    devices  each device in Machine.devices by name (its save())
    virtio   each attached virtio device: its transport's and its model's state
Guest RAM goes to the sparse ``memory`` file and is mapped back MAP_PRIVATE; a
copy-on-write disk overlay is saved beside it (a restored guest sees exactly the disk
it had). ``deps`` records what the snapshot depends on — pyvmm's version, the machine's
shape, the CPU profile and host quirks, the KVM facts a restore relies on (the CPUID
table given to the guest, the MSR list) and each disk image by path, size and mtime —
and a restore refuses any difference before it builds anything.

Data flows one way: vmm.machine calls here (save, restore_state, after_restore) and
this module calls the state functions of the parts; it never issues an ioctl itself.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from vmm import __version__
from vmm.paths import sha256
from vmm.snapshot.format import SnapshotError, read_snapshot, write_snapshot

#: Bumped when what ``state`` holds changes shape (the file format has its own version).
STATE_VERSION = 1


# -- what a snapshot depends on ---------------------------------------------------------


def _disk_dep(disk) -> str:
    if disk.path is None:
        return "empty drive"
    try:
        st = os.stat(disk.path)
    except OSError as e:
        raise SnapshotError(f"disk {disk.path}: {e.strerror}") from None
    return (f"{os.path.abspath(disk.path)} size={st.st_size} mtime_ns={st.st_mtime_ns} "
            f"ro={int(disk.read_only)} snapshot={int(disk.snapshot)}"
            + (" inserted" if disk.inserted else ""))


def _cpuid_digest(table) -> str:
    h = sha256()
    for entry in table:
        h.update(bytes(entry))
    return h.hexdigest()[:32]


def host_deps(config, kvm, cpuid_table) -> dict:
    """Everything a restore of a machine shaped like ``config`` on this host relies on.

    Args:
        config: the MachineConfig.
        kvm: an open vmm.kvm.Kvm (for its MSR list).
        cpuid_table: the CPUID entries vCPU 0 gets (vmm.arch.x86_64.cpuid.vcpu_cpuid).
    """
    deps = {
        "pyvmm": __version__,
        "state_version": STATE_VERSION,
        "arch": "x86_64",
        "kind": config.kind,
        "mem_size": config.mem_size,
        "cpus": config.cpus,
        "cpu_profile": config.cpu_profile,
        "quirk_int3": bool(config.quirks.complete_int3),
        "quirk_fwait": bool(config.quirks.complete_fwait),
        "cpuid": _cpuid_digest(cpuid_table),
        "msrs": sha256(repr(sorted(kvm.msr_index_list())).encode()).hexdigest()[:32],
    }
    for i, disk in enumerate(config.disks):
        deps[f"disk{i}"] = _disk_dep(disk)
    return deps


def _expected_deps(config) -> dict:
    """host_deps for ``config`` on this host, computed before any VM is built."""
    from vmm import kvm as kvmlib
    from vmm.arch.x86_64 import cpuid
    with kvmlib.Kvm() as kvm:
        table = cpuid.vcpu_cpuid(kvm.supported_cpuid(), 0, config.cpus)
        return host_deps(config, kvm, table)


# -- save --------------------------------------------------------------------------------


def disk_file(index: int) -> str:
    """The snapshot file holding virtio device ``index``'s copy-on-write overlay."""
    return f"disk{index}.overlay"


def _config_state(cfg) -> dict:
    return {
        "kernel": str(cfg.kernel),
        "kind": cfg.kind,
        "mem_size": cfg.mem_size,
        "cpus": cfg.cpus,
        "cmdline": cfg.cmdline,
        "cpu_profile": cfg.cpu_profile,
        "quirks": [bool(cfg.quirks.complete_int3), bool(cfg.quirks.complete_fwait)],
        "system_map": None if cfg.system_map is None else str(cfg.system_map),
        "disks": [{"path": None if d.path is None else os.path.abspath(d.path),
                   "read_only": bool(d.read_only), "serial": d.serial, "cache": d.cache,
                   "snapshot": bool(d.snapshot), "inserted": bool(d.inserted)}
                  for d in cfg.disks],
    }


def save(machine, directory) -> object:
    """Save a paused ``machine`` to ``directory`` (which must not exist, or be empty).

    Returns:
        the vmm.snapshot.format.SnapshotInfo.
    Raises:
        SnapshotError: the directory is taken, a device cannot be saved; nothing is
            left half written.
    """
    from vmm.arch.x86_64 import cpustate
    if not machine.paused:
        raise SnapshotError("cannot snapshot a running VM: pause it first")
    t0 = time.monotonic()
    try:
        cpustate.check_host(machine.kvm)
    except cpustate.CpuStateError as e:
        raise SnapshotError(str(e)) from None
    msrs = cpustate.snapshot_msr_indices(machine.kvm, machine.loops[0].vcpu)
    state = {
        "v": STATE_VERSION,
        "config": _config_state(machine.config),
        "vm": cpustate.save_vm(machine.vm),
        "vcpus": [cpustate.save_vcpu(loop.vcpu, msrs) for loop in machine.loops],
        "devices": {name: dev.save() for name, dev in machine.devices.items()},
        "virtio": [],
    }
    files = {}
    for i, slot in enumerate(machine.virtio):
        state["virtio"].append({"name": slot.name, "transport": slot.transport.save()})
        if getattr(slot.device, "snapshot", False):
            # A copy-on-write overlay belongs to the snapshot: its data is written into
            # the snapshot's (temporary) directory, self-describing, and reopened from
            # there on restore (a private copy: the snapshot is never modified).
            files[disk_file(i)] = slot.device.save_overlay
    deps = host_deps(machine.config, machine.kvm, machine.cpuid_table)
    state_t = time.monotonic()
    info = write_snapshot(directory, state=state, memory=machine.mem, deps=deps, files=files)
    machine.times["snapshot-state"] = state_t - t0
    return info


# -- restore -----------------------------------------------------------------------------


def load(directory, **overrides):
    """Read and check the snapshot in ``directory`` against this host; return
    ``(snapshot, config)`` ready for ``Machine(config, snapshot=snapshot)``.

    ``overrides``: the MachineConfig fields a restore may choose (console, markers,
    serial2, loop, system_map).

    Raises:
        SnapshotError: missing, truncated, corrupted, from another pyvmm, or made on a
            machine/host this one does not match (one line, nothing touched).
    """
    from vmm.config import DiskConfig, MachineConfig
    from vmm.cpuprofile import HostQuirks
    snap = read_snapshot(directory)
    try:
        c = snap.state["config"]
        if snap.state.get("v") != STATE_VERSION:
            raise SnapshotError(f"snapshot {directory}: state version {snap.state.get('v')!r} "
                                f"is not {STATE_VERSION}")
        disks = [DiskConfig(None if d["path"] is None else Path(d["path"]),
                            read_only=bool(d["read_only"]), serial=d["serial"],
                            cache=str(d["cache"]), snapshot=bool(d["snapshot"]),
                            inserted=bool(d.get("inserted", False)))
                 for d in c["disks"]]
        config = MachineConfig(
            kernel=Path(c["kernel"]), mem_size=int(c["mem_size"]), cpus=int(c["cpus"]),
            kind=str(c["kind"]), cmdline=str(c["cmdline"]),
            quirks=HostQuirks(complete_int3=bool(c["quirks"][0]),
                              complete_fwait=bool(c["quirks"][1])),
            disks=disks, cpu_profile=str(c["cpu_profile"]),
            system_map=Path(c["system_map"]) if c.get("system_map") else None, **overrides)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise SnapshotError(f"snapshot {directory}: malformed machine state ({e})") from None
    want = _expected_deps(config)
    have = snap.deps
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            raise SnapshotError(f"snapshot {directory} does not fit here: {key} is "
                                f"{have.get(key)!r} in the snapshot, {want.get(key)!r} now")
    return snap, config


def restore_state(machine, snap) -> None:
    """Put a freshly built machine (hardware created, vCPUs without state) into the
    snapshot's state: VM (PIT2, CLOCK, irqchips), then each vCPU, then the devices."""
    from vmm.arch.x86_64 import cpustate
    state = snap.state
    try:
        if len(state["vcpus"]) != len(machine.loops):
            raise SnapshotError("snapshot has state for "
                                f"{len(state['vcpus'])} vCPUs, the VM has {len(machine.loops)}")
        cpustate.restore_vm(machine.vm, state["vm"])
        for loop, vstate in zip(machine.loops, state["vcpus"]):
            cpustate.restore_vcpu(loop.vcpu, vstate)
        devices = state["devices"]
        if set(devices) != set(machine.devices):
            raise SnapshotError(f"snapshot devices {sorted(devices)} differ from the VM's "
                                f"{sorted(machine.devices)}")
        for name, dev in machine.devices.items():
            dev.restore(devices[name])
        virtio = state["virtio"]
        if [v["name"] for v in virtio] != [s.name for s in machine.virtio]:
            raise SnapshotError("snapshot virtio devices differ from the VM's")
        for slot, v in zip(machine.virtio, virtio):
            slot.transport.restore(v["transport"])     # the device model's state within
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise SnapshotError(f"snapshot {snap.directory}: cannot restore ({e})") from None


def after_restore(machine) -> None:
    """Once the restored VM is about to run: let each virtio device process what its
    driver had made available before the pause (a request posted but not yet taken
    completes now)."""
    for slot in machine.virtio:
        slot.transport.kick_all()
