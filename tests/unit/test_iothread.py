"""The I/O thread: its own eventfds, and readiness callbacks on a backend's fd."""

from __future__ import annotations

import os
import socket
import threading

from vmm.iothread import IoThread


def test_eventfd_handler_and_reader_side_by_side():
    io = IoThread()
    a, b = socket.socketpair()
    got, notified = [], threading.Event()
    received = threading.Event()

    def on_readable():
        got.append(a.recv(64))     # the callback consumes what made the fd readable
        received.set()

    try:
        efd = io.add(notified.set)
        io.add_reader(a.fileno(), on_readable)
        io.start()
        os.eventfd_write(efd, 1)
        assert notified.wait(5)
        b.send(b"frame")
        assert received.wait(5)
        assert got == [b"frame"]
        # Removed while running: later data is left for the owner.
        io.remove_reader(a.fileno())
        received.clear()
        b.send(b"late")
        assert not received.wait(0.2)
    finally:
        io.close()
    assert a.recv(64) == b"late"      # the reader's fd is the caller's: still open
    a.close()
    b.close()


def test_a_reader_alone_starts_the_thread():
    io = IoThread()
    r, w = os.pipe()
    seen = threading.Event()
    try:
        io.add_reader(r, lambda: (os.read(r, 16), seen.set()))
        io.start()
        assert io.thread is not None
        os.write(w, b"x")
        assert seen.wait(5)
    finally:
        io.close()
        os.close(r)
        os.close(w)


def test_a_failing_callback_reports_through_on_error():
    io = IoThread()
    r, w = os.pipe()
    errors, failed = [], threading.Event()
    io.on_error = lambda e: (errors.append(e), failed.set())

    def boom():
        raise ValueError("backend broke")

    try:
        io.add_reader(r, boom)
        io.start()
        os.write(w, b"x")
        assert failed.wait(5)
        assert str(errors[0]) == "backend broke"
    finally:
        io.close()
        os.close(r)
        os.close(w)
