"""Console event watching and the terminal's escape handling, without a VM."""

from __future__ import annotations

import os

from vmm.console import MAX_LINE, ConsoleWatcher
from vmm.terminal import ConsoleInput, ConsoleOutput


def watch(chunks, markers=None):
    out, events = bytearray(), []
    w = ConsoleWatcher([out.extend], events.append, markers)
    for c in chunks:
        w.write(c)
    return bytes(out), events, w


def test_output_passes_through_unchanged():
    data = [b"abc", b"\x00\xff\r\n", b"x" * 10000]
    out, events, _ = watch(data)
    assert out == b"".join(data) and events == []


def test_kernel_events_across_chunk_boundaries():
    text = b"[ 1.0] reboot: Power down\n"
    _, events, _ = watch([text[:10], text[10:17], text[17:]])
    assert events == ["poweroff"]
    _, events, _ = watch([b"[ 2.0] reboot: System halted\n"])
    assert events == ["poweroff"]
    _, events, _ = watch([b"[ 3.0] reboot: Restarting system\n"])
    assert events == ["reboot"]


def test_panic_sets_flag_and_end_marker_is_reported():
    _, events, w = watch([b"Kernel panic - not syncing: Attempted to kill init!\n",
                          b"---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n"])
    assert w.panicked
    assert events == ["panic", "panic-end"]


def test_custom_marker():
    _, events, _ = watch([b"pyvmm: rea", b"dy\n"], {b"pyvmm: ready": "ready"})
    assert events == ["ready"]


def test_a_line_without_newline_stays_bounded():
    _, _, w = watch([b"y" * 100_000] * 20)
    assert len(w._line) <= MAX_LINE
    assert len(w.tail) <= 4096


def test_marker_not_split_by_an_unbounded_line():
    _, events, _ = watch([b"z" * 5000 + b"\n", b"reboot: Power down\n"])
    assert events == ["poweroff"]


def test_console_output_tracks_open_lines(tmp_path):
    r, w = os.pipe()
    log = tmp_path / "log"
    out = ConsoleOutput(fd=w, log_path=str(log))
    out.write(b"partial")
    assert out.mid_line
    out.end_line()
    out.write(b"done\n")
    assert not out.mid_line
    out.close()
    os.close(w)
    assert os.read(r, 100) == b"partial\r\ndone\n"
    assert log.read_bytes() == b"partialdone\n"


def make_input(is_tty=True):
    sent, quits, helps = bytearray(), [], []
    ci = ConsoleInput(lambda d: (sent.extend(d), len(d))[1], lambda: 64,
                      lambda: quits.append(1), helps.append, fd=os.open("/dev/null", os.O_RDONLY))
    ci.is_tty = is_tty
    return ci, sent, quits, helps


def test_escape_keys_on_a_terminal():
    ci, sent, quits, helps = make_input()
    assert ci._translate(b"ab\x01\x01c\x01h") == b"ab\x01c"
    assert helps and "Ctrl-A x" in helps[0]
    assert ci._translate(b"d\x01xignored") == b"d"
    assert quits == [1]


def test_escape_split_across_reads():
    ci, _, quits, _ = make_input()
    assert ci._translate(b"q\x01") == b"q"
    assert ci._translate(b"x") == b""
    assert quits == [1]


def test_no_translation_when_not_a_terminal():
    ci, _, quits, _ = make_input(is_tty=False)
    assert ci._translate(b"\x01x\x01h") == b"\x01x\x01h"
    assert quits == []


def test_input_waits_for_fifo_space():
    room = [0]
    sent = bytearray()

    def send(d):
        n = min(len(d), room[0])
        sent.extend(d[:n])
        room[0] -= n
        return n

    ci = ConsoleInput(send, lambda: room[0], lambda: None, lambda t: None,
                      fd=os.open("/dev/null", os.O_RDONLY))
    import threading
    t = threading.Thread(target=ci._deliver, args=(b"0123456789",))
    t.start()
    for _ in range(5):
        room[0] += 2
        import time
        time.sleep(0.02)
    t.join(2)
    assert bytes(sent) == b"0123456789"


def test_input_longer_than_the_fifo_never_sets_the_uarts_overrun():
    # Piped input (pyvmm restore DIR < script) bigger than the UART's FIFO: only what
    # fits is offered, so no byte is dropped and LSR OE (which Linux reports as "ttyS0:
    # input overrun") is never set; found by tests/linux/test_snapshot.py's SMP test.
    import threading
    from vmm.devices import serial8250
    uart = serial8250.Serial8250(lambda: None, lambda data: None, fifo_size=16)
    ci = ConsoleInput(uart.enqueue_input, uart.input_space, lambda: None, lambda t: None,
                      fd=os.open("/dev/null", os.O_RDONLY))
    data = bytes(range(32, 127)) * 2
    t = threading.Thread(target=ci._deliver, args=(data,))
    t.start()
    got, lsrs = bytearray(), []
    import time
    deadline = time.monotonic() + 10
    while len(got) < len(data) and time.monotonic() < deadline:
        lsr = uart.read(5, 1)                            # LSR (reading it clears OE)
        lsrs.append(lsr)
        if lsr & 0x01:                                   # DR: read RBR
            got.append(uart.read(0, 1))
    t.join(2)
    assert bytes(got) == data
    assert not any(lsr & 0x02 for lsr in lsrs), "LSR OE was set"
