"""Claims on units and run directories: one holder, live holders respected, dead ones taken over."""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

from targets.claims import Heartbeat, Holder, read_claim, release, try_claim


def test_one_holder_and_release(tmp_path):
    path = tmp_path / "u.claim"
    me = Holder.me()
    assert try_claim(path, me) == (True, None)
    assert try_claim(path, me) == (True, None)  # held already
    other = replace(me, pid=me.pid + 1, started="later")
    assert try_claim(path, other) == (False, me)  # my pid on this host is alive
    release(path, other)  # not the holder: nothing happens
    assert path.exists()
    release(path, me)
    assert not path.exists()


def test_a_dead_holder_is_taken_over(tmp_path):
    path = tmp_path / "u.claim"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = replace(Holder.me(), pid=int(proc.stdout))  # that process has exited
    path.write_text(json.dumps(asdict(dead)))
    me = Holder.me()
    assert try_claim(path, me) == (True, None)
    assert read_claim(path)[0] == me and not list(tmp_path.glob("*.stale.*"))


def test_another_hosts_claim_lives_while_its_heartbeat_does(tmp_path):
    path = tmp_path / "u.claim"
    remote = replace(Holder.me(), host="another-host", pid=1)
    path.write_text(json.dumps(asdict(remote)))
    me = Holder.me()
    assert try_claim(path, me, stale_after=60) == (False, remote)
    old = time.time() - 120
    os.utime(path, (old, old))
    assert try_claim(path, me, stale_after=60) == (True, None)


def test_a_reused_pid_does_not_keep_a_claim_alive(tmp_path):
    path = tmp_path / "u.claim"
    reused = replace(Holder.me(), pid_start="1")  # this pid, but started at another time
    path.write_text(json.dumps(asdict(reused)))
    assert try_claim(path, Holder.me()) == (True, None)


def test_heartbeat_refreshes_held_claims(tmp_path):
    path = tmp_path / "u.claim"
    me = Holder.me()
    try_claim(path, me)
    old = time.time() - 1000
    os.utime(path, (old, old))
    beat = Heartbeat(period=0.05)
    beat.add(path)
    time.sleep(0.3)
    beat.stop()
    assert read_claim(path)[1] < 5


def test_a_claim_being_written_is_waited_for(tmp_path):
    """A claim file without a holder yet is its creator's, for a moment: try_claim reads it again."""
    import threading

    path = tmp_path / "u.claim"
    path.touch()
    other = replace(Holder.me(), started="other")  # alive: this process
    writer = threading.Timer(0.3, lambda: path.write_text(json.dumps(asdict(other))))
    writer.start()
    assert try_claim(path, replace(other, started="me")) == (False, other)
    writer.join()


def test_a_half_written_claim_of_a_failed_process_is_taken_over(tmp_path):
    """A process whose write of the claim failed (EIO) leaves an empty file: after HALF_WRITTEN_FOR it is
    abandoned, never read as "done" or as held."""
    from targets.claims import HALF_WRITTEN_FOR

    path = tmp_path / "u.claim"
    path.write_text('{"host": ')
    old = time.time() - HALF_WRITTEN_FOR - 1
    os.utime(path, (old, old))
    me = Holder.me()
    assert try_claim(path, me) == (True, None)
    assert read_claim(path)[0] == me
