"""QMPClient against a real QEMU (-machine none, one per test)."""

import os
import signal
import time

import gevent
import pytest

from vmbridge.qmp import (QMPClient, QMPCommandError, QMPDisconnectedError,
                          State)
from vmbridge.qmp import transport
from vmbridge.qmp.schema import KNOWN_TYPES

# Shared test modules: rewrite their asserts too (before importing them).
from qemu_helpers import TIMEOUT, kill_qemu, spawn_qemu_unix

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_handshake_states_version_capabilities(qemu_qmp):
    _proc, sock = qemu_qmp
    with QMPClient(sock, name="vm") as client:
        assert client.state is State.HANDSHAKE_INITIAL
        assert client.greeting is None and client.version is None
        assert sock.fileno() == -1  # adopted: the client owns the fd now
        client.handshake(timeout=TIMEOUT)
        assert client.state is State.RUNNING
        assert client.version["qemu"]["major"] >= 7
        assert isinstance(client.version["package"], str)
        assert isinstance(client.capabilities, list)
        assert client.greeting["version"] is client.version
        client.handshake(timeout=TIMEOUT)  # idempotent
    assert client.state is State.DISCONNECTED


def test_execute_starts_the_handshake(qemu_qmp):
    _proc, sock = qemu_qmp
    with QMPClient(sock) as client:
        status = client.execute("query-status", timeout=TIMEOUT)
        assert status["status"] == "prelaunch" and status["running"] is False
        assert client.state is State.RUNNING


def test_schema_arrives_in_many_reads_and_answers_probes(qemu_client, monkeypatch):
    # 4 KB reads turn the ~200 KB reply into 50+ partial reads.
    monkeypatch.setattr(transport, "RECV_SIZE", 4096)
    schema = qemu_client.schema()
    assert len(schema) > 500
    assert qemu_client.schema() is schema  # fetched once
    assert qemu_client.has_command("query-status")
    assert qemu_client.has_command("blockdev-add")
    assert not qemu_client.has_command("no-such-command")
    assert qemu_client.has_event("STOP")
    assert not qemu_client.has_event("query-status")

    probe = qemu_client.schema_has_member
    assert probe("blockdev-add", "driver")            # command argument
    assert probe("blockdev-add", "aio")               # ... of a union branch
    assert probe("blockdev-add/driver=file", "filename")
    assert probe("BlockdevOptionsFile", "aio")
    assert probe("BlockdevAioOptions", "io_uring")    # enum value (Debian builds io_uring)
    assert probe("BlockdevAioOptions", "threads")
    assert probe("JOB_STATUS_CHANGE", "status")       # event data
    assert probe("JobStatus", "concluded")
    assert probe("RunState", "prelaunch")             # via a return type
    assert not probe("BlockdevAioOptions", "no-such-mode")
    assert not probe("blockdev-add", "no-such-member")
    assert not probe("blockdev-add/driver=no-such-driver", "filename")
    assert not probe("query-status", "anything")      # takes no arguments
    assert not probe("no-such-command", "driver")     # older QEMU: just absent
    with pytest.raises(ValueError, match="type name"):
        probe("NoSuchQapiType", "x")                  # unanswerable: names are masked
    assert qemu_client.schema_lookup("BlockdevAioOptions")["meta-type"] == "enum"
    unresolved = [name for name in KNOWN_TYPES if qemu_client.schema_lookup(name) is None]
    assert not unresolved, "KNOWN_TYPES paths that do not resolve on this QEMU"


def test_stop_cont_events_via_listener_and_callback(qemu_client):
    seen = []
    qemu_client.on_event(seen.append)
    with qemu_client.listen({"STOP", "RESUME"}) as listener:
        before = time.time()
        qemu_client.execute("cont", timeout=TIMEOUT)
        qemu_client.execute("stop", timeout=TIMEOUT)
        resume = listener.get(timeout=TIMEOUT)
        stop = listener.get(timeout=TIMEOUT)
    assert (resume.name, stop.name) == ("RESUME", "STOP")
    assert resume.data is None and resume.raw["event"] == "RESUME"
    # QEMU's wall clock on this very host: generous bounds, no timing claim.
    assert before - 60 < resume.timestamp <= stop.timestamp < time.time() + 60
    assert [event.name for event in seen] == ["RESUME", "STOP"]
    assert qemu_client.execute("query-status")["status"] == "paused"


def test_getfd_closefd_with_a_real_fd(qemu_client):
    read_end, write_end = os.pipe()
    try:
        qemu_client.getfd(read_end, "pipe-r")
        qemu_client.closefd("pipe-r")
        with pytest.raises(QMPCommandError) as caught:
            qemu_client.closefd("pipe-r")  # QEMU closed it: the name is gone
        assert caught.value.error_class == "GenericError"
        assert "pipe-r" in caught.value.desc
        assert caught.value.command == "closefd"
        os.fstat(read_end)  # ours stayed open: SCM_RIGHTS sent a duplicate
    finally:
        os.close(read_end)
        os.close(write_end)


def test_getfd_without_fd_reports_fds_not_sent(qemu_client):
    with pytest.raises(QMPCommandError) as caught:
        qemu_client.execute("getfd", {"fdname": "nothing"})
    assert "SCM_RIGHTS" in caught.value.desc
    assert caught.value.fds_sent is False


def test_add_fd_remove_fd(qemu_client):
    # QEMU 7.2 closes removed fd-set members only while the VM runs.
    qemu_client.execute("cont")
    read_end, write_end = os.pipe()
    try:
        added = qemu_client.add_fd(write_end, opaque="test-pipe")
        assert set(added) == {"fdset-id", "fd"}
        fdsets = qemu_client.execute("query-fdsets")
        assert {"fd": added["fd"], "opaque": "test-pipe"} in [
            fd for fdset in fdsets if fdset["fdset-id"] == added["fdset-id"]
            for fd in fdset["fds"]]
        again = qemu_client.add_fd(read_end, fdset_id=added["fdset-id"])
        assert again["fdset-id"] == added["fdset-id"]
        qemu_client.remove_fd(added["fdset-id"], added["fd"])
        qemu_client.remove_fd(added["fdset-id"])
        assert qemu_client.execute("query-fdsets") == []
        with pytest.raises(QMPCommandError):
            qemu_client.remove_fd(added["fdset-id"])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_unknown_command(qemu_client):
    with pytest.raises(QMPCommandError) as caught:
        qemu_client.execute("no-such-command")
    assert caught.value.error_class == "CommandNotFound"
    assert qemu_client.execute("query-status")["status"] == "prelaunch"


def test_execute_raw_returns_error_replies_without_id(qemu_client):
    reply = qemu_client.execute_raw({"execute": "query-status", "id": "theirs"})
    assert set(reply) == {"return"}
    reply = qemu_client.execute_raw({"execute": "query-status", "arguments": [], "id": 7})
    assert set(reply) == {"error"} and reply["error"]["class"] == "GenericError"


def test_hundred_concurrent_callers_get_their_own_replies(qemu_client):
    options = [entry["option"] for entry in
               qemu_client.execute("query-command-line-options")][:10]

    def call(i):
        kind = i % 4
        if kind == 0:  # the reply names the option asked about
            option = options[i % len(options)]
            result = qemu_client.execute("query-command-line-options", {"option": option})
            return result[0]["option"] == option
        if kind == 1:  # HMP echoes an unknown command's name
            text = qemu_client.execute("human-monitor-command",
                                       {"command-line": f"nosuch{i}"})
            return f"'nosuch{i}'" in text
        if kind == 2:  # the error names the fd asked about
            try:
                qemu_client.closefd(f"nope-{i}")
            except QMPCommandError as exc:
                return f"'nope-{i}'" in exc.desc
            return False
        try:  # an error naming the bad option
            qemu_client.execute("query-command-line-options", {"option": f"bad-{i}"})
        except QMPCommandError as exc:
            return exc.desc.endswith(f"bad-{i}")
        return False

    callers = [gevent.spawn(call, i) for i in range(100)]
    gevent.joinall(callers, timeout=TIMEOUT, raise_error=True)
    assert [caller.value for caller in callers] == [True] * 100


def wait_all_threads_stopped(pid: int) -> None:
    """SIGSTOP stops each thread asynchronously; wait until all have."""
    def states():
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                yield stat.read().rsplit(")", 1)[1].split()[0]
    with gevent.Timeout(TIMEOUT):
        while not all(state == "T" for state in states()):
            gevent.sleep(0.001)


def test_qemu_killed_while_commands_pending(qemu_qmp, qemu_client):
    proc, _sock = qemu_qmp
    reasons = []
    qemu_client.on_disconnect(reasons.append)
    with qemu_client.listen() as listener:
        # A stopped QEMU reads nothing, so every command stays pending.
        os.kill(proc.pid, signal.SIGSTOP)
        wait_all_threads_stopped(proc.pid)
        callers = [gevent.spawn(qemu_client.execute, "query-status") for _ in range(20)]
        gevent.sleep(0.05)
        assert all(not caller.ready() for caller in callers)
        kill_qemu(proc)
        gevent.joinall(callers, timeout=TIMEOUT)
        for caller in callers:
            assert isinstance(caller.exception, QMPDisconnectedError)
        with pytest.raises(QMPDisconnectedError):
            listener.get(timeout=TIMEOUT)
    assert qemu_client.state is State.DISCONNECTED
    assert len(reasons) == 1 and isinstance(reasons[0], QMPDisconnectedError)
    assert reasons[0] is qemu_client.disconnect_reason
    with pytest.raises(QMPDisconnectedError):
        qemu_client.execute("query-status")  # immediately, no waiting
    late = []
    qemu_client.on_disconnect(late.append)  # after the fact: called at once
    assert late == reasons
    qemu_client.close()
    assert len(reasons) == 1


def test_connect_unix(tmp_path):
    path = str(tmp_path / "qmp.sock")
    proc = spawn_qemu_unix(path)
    try:
        with QMPClient.connect_unix(path, name="unix", timeout=TIMEOUT) as client:
            assert client.state is State.HANDSHAKE_INITIAL
            assert client.execute("query-status", timeout=TIMEOUT)["status"] == "prelaunch"
    finally:
        kill_qemu(proc)


def test_connect_unix_missing_socket(tmp_path):
    with pytest.raises(FileNotFoundError):
        QMPClient.connect_unix(str(tmp_path / "absent.sock"))
