"""runc's page connection (runtimes/oci.py _PageSocket): CRIU is handed one end of a
socketpair through its configuration file, and the address runc is told instead is a port
where nobody, CRIU falling back to TCP included, can listen or connect."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from livemig.runtimes import oci


def test_criu_is_named_the_far_end_of_our_socketpair_above_the_fds_runc_hands_it(tmp_path):
    pages = oci._PageSocket(tmp_path)
    try:
        assert pages.fd >= oci._PAGES_FD_FLOOR and pages.pass_fds == (pages.fd,)
        assert pages.env["CRIU_CONFIG_FILE"] == str(tmp_path / oci.PAGES_CONFIG)
        assert (tmp_path / oci.PAGES_CONFIG).read_text() == f"ps-socket {pages.fd}\n"
        with socket.socket(fileno=os.dup(pages.fd)) as theirs:     # what CRIU writes, we read
            theirs.sendall(b"page")
            assert pages.ours.recv(4) == b"page"
        pages.started()
        assert pages.fd == -1
    finally:
        pages.close()


def test_the_port_runc_is_told_can_be_neither_listened_on_nor_connected_to(tmp_path):
    pages = oci._PageSocket(tmp_path)
    try:
        host, port = pages.address.rsplit(":", 1)
        # as CRIU's setup_tcp_server binds a lazy page server: every address, SO_REUSEADDR
        with socket.socket() as criu:
            criu.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError) as bound:
                criu.bind(("0.0.0.0", int(port)))
            assert bound.value.errno == errno.EADDRINUSE
        with pytest.raises(ConnectionRefusedError):      # as CRIU connects, a page-server client
            socket.create_connection((host, int(port)), timeout=5).close()
    finally:
        pages.close()
