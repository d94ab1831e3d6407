#!/usr/bin/python3
"""Runs redis_loop_test in outage mode against its own redis-server and breaks the server underneath it.

    /usr/bin/python3 tests/integration/redis_outage.py path/to/redis_loop_test [--max-recovery-ms 2500]

Timeline (seconds after the test's first command): 2 kill -9, 4 restart (AOF reload), 7 SIGSTOP,
10 SIGCONT, 12 `ss -K` of the client connections (skipped without CAP_NET_ADMIN), 16 end.
For each outage the test reports when its first command succeeded again; recovery is measured from
the moment the server could answer again (PONG after restart, SIGCONT, the cut). Exits 1 if the test
failed (a callback missing or called twice, a hang) or a recovery took longer than allowed.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def wall_ms():
    return int(time.time() * 1000)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pong(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Redis:
    def __init__(self, tmpdir, port):
        self.dir = os.path.join(tmpdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.log = open(os.path.join(tmpdir, "redis.log"), "ab")
        self.port = port
        self.proc = None

    def start(self, timeout=5.0):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if pong(self.port):
                return wall_ms()
            time.sleep(0.01)
        raise RuntimeError("redis-server did not answer PING")

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("test")
    ap.add_argument("--max-recovery-ms", type=int, default=2500)
    args = ap.parse_args()

    tmpdir = tempfile.mkdtemp(prefix="redis-outage-")
    redis = Redis(tmpdir, free_port())
    failed = []
    try:
        redis.start()
        test = subprocess.Popen([args.test, "127.0.0.1", str(redis.port), "outage", "16"], stdout=subprocess.PIPE,
                                stderr=open(os.path.join(tmpdir, "test.stderr"), "wb"), text=True)
        lines, started = [], threading.Event()

        def reader():
            for line in test.stdout:
                lines.append(line)
                sys.stdout.write(line)
                sys.stdout.flush()
                if line.startswith("# outage mode:"):
                    started.set()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        if not started.wait(10):
            raise RuntimeError("the test did not start")
        t0 = time.monotonic()
        back = []  # (what, wall ms the outage began, wall ms at which the server could answer again)

        def at(sec):
            time.sleep(max(0.0, t0 + sec - time.monotonic()))

        def note(what):
            print(f"# harness: {what} at +{time.monotonic() - t0:.3f} s (wall {wall_ms()})", flush=True)

        at(2)
        began = wall_ms()
        redis.signal(signal.SIGKILL)
        redis.proc.wait()
        note("kill -9")
        at(4)
        up = redis.start()
        note("restarted, answering PING")
        back.append(("kill -9 + restart", began, up))
        at(7)
        began = wall_ms()
        redis.signal(signal.SIGSTOP)
        note("SIGSTOP")
        at(10)
        redis.signal(signal.SIGCONT)
        back.append(("SIGSTOP 3 s + SIGCONT", began, wall_ms()))
        note("SIGCONT")
        at(12)
        began = wall_ms()
        cut = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(redis.port)], capture_output=True)
        if cut.returncode == 0:
            back.append(("ss -K", began, began))
            note("ss -K")
        else:
            print("# harness: ss -K not permitted here, skipped", flush=True)

        try:
            rc = test.wait(timeout=30)
        except subprocess.TimeoutExpired:
            test.kill()
            rc = "hung"
        t.join(5)
        if rc != 0:
            failed.append(f"the test exited with {rc}")

        recovered = [int(m.group(1)) for m in (re.search(r"recovered at wall (\d+)", l) for l in lines) if m]
        for what, began, when in back:
            after = [r for r in recovered if r >= began]
            if not after:
                failed.append(f"{what}: no recovery reported")
                continue
            ms = after[0] - when  # may be slightly negative: the client can beat the harness' own PING
            print(f"# recovery after {what}: {ms} ms", flush=True)
            if ms > args.max_recovery_ms:
                failed.append(f"{what}: recovery took {ms} ms")
    finally:
        redis.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)

    for f in failed:
        print(f"# FAILED: {f}")
    print(f"{1 if not failed else 0} passed, {1 if failed else 0} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
