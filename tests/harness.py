"""Starts real PostgreSQL, Redis and cityhall processes for tests and load tests, and talks to them.

Used by tests/run.py, tests/integration/test_*.py and loadtest/ (add tests/ to sys.path, then
`import harness`). Python standard library only; run it with Debian's /usr/bin/python3.

The API (kept small and stable):

    free_port() -> int                      a free TCP port on 127.0.0.1 (never a fixed one)
    wait_for(predicate, timeout, ...)       poll until predicate() is truthy, with a deadline
    tls_cert() -> (cert_path, key_path)     a self-signed P-256 cert for 127.0.0.1/localhost,
                                            made once per process
    Postgres(tmpdir)                        initdb'd cluster in tmpdir/pg, started on a free port
        .port .conninfo .pid .psql(sql) .stop(mode) .start() .pause() .resume() .running
    Redis(tmpdir)                           redis-server with AOF in tmpdir/redis, on a free port
        .port .pid .cli(*args) .ping() .dump() .stop() .kill() .start() .pause() .resume() .running
    Gateway(tmpdir, pg, redis, threads=2, env=None)
                                            build/cityhall serve, configured by environment only
        .http_port .https_port .pid .env .url(path, tls) .request(path, ...) .run(*args)
        .keys_init() .migrate() .start() .stop() -> exit code .terminate() .wait() .kill() .running
        .log_text() .log_json() (the JSON lines of its stderr)
    Cluster(threads=2, env=None, gateway=True)
                                            context manager: one temp folder, the three above
        .tmpdir .pg .redis .gateway .ensure_running() .close()
    curl(url, method, http, headers, data, timeout, json) -> Response
    curl_async(...) -> CurlCall with .wait() -> Response   (a curl running in the background)
    Response: .status .headers (dict, lower-case names) .body (bytes) .http_version .json() .text
    CurlError: curl failed without an HTTP response (.rc is curl's exit code, 7 = refused)
    pb_encode(fields) / pb_decode(data) / pb_int64(u) / Fixed32 / Fixed64: protobuf wire format
    totp(secret_b32, step=0, at=None) -> str
                                            RFC 6238 code (HMAC-SHA1, 30 s, 6 digits) for staff logins
    printed_fields(stdout) -> dict          the `name:  value` lines a cityhall command prints
    staff_add(gw, dept, hall, roles, username) -> dict
                                            `cityhall staff add`: {username, password, secret, staff_id, dept,
                                            hall, out}
    staff_token(gw, dept, hall, roles, step) -> dict
                                            a new staff account logged in: the above + token (+ login body)
    admin_token(gw) -> str                  an admin's access token (`staff add --roles admin`), one per gateway
    client_add(gw, dept) -> dict            `cityhall client add`: {client_id, secret, dept, out}
    client_token(gw, dept) -> dict          the above + POST /v1/auth/client-token: + token, until
    sms_codes(gw, phone) / wait_sms_code(gw, phone, before=0)
                                            the phone's codes in the development SMS outbox / the next one
    sms_login(gw, phone) -> dict            a citizen's SMS login through the development outbox (the per-IP
                                            and per-phone send limits lifted first): the TokenResponse + phone,
                                            token
    sms_lift_limits(gw, phone)              deletes those limits' Redis keys
    bind_real_name(gw, token, id_number, name)
                                            POST /v1/me/real-name, asserting 200
    data_key(gw) / keyed_hash(gw, domain, value) / id_hmac(gw, number)
                                            the data key's halves; ch_pii_hmac as hex; its "id" domain
    same_household(gw, citizen_id, *id_numbers)
                                            one new household for the citizen's resident and these residents
    assert_error(resp, status, code, message, hidden)
                                            DESIGN's error shape (and no `hidden` string in the body)
    id_check_char(first17) / new_id_number(region, birth, sex, used, check) / id_birth_date(number)
                                            GB 11643 ID numbers for synthetic residents
    new_phone(used) / new_name(length) / china_today() / years_before(d, years)
    import_registry(gw, rows, header, check)
                                            `cityhall import registry` of REGISTRY_HEADER + rows (CSV lines or
                                            sequences of values)
    resident_id(gw, number) -> int          registry_residents.resident_id of an ID number
    shared(cluster, key, make)              make() once per cluster and key
    Skip: raise it in a test to report it as skipped (Gateway raises it when not built)
    ROOT, BUILD, gateway_binary(): the repository, the build dir ($CITYHALL_BUILD or build/),
                                   and build/cityhall in it
    started_gateways(): every Gateway created in this process (the runner prints their logs)

Every process is started in its own session (a Ctrl-C on the runner does not reach it), is
stopped by PID, and is killed by an atexit hook if the caller forgot; when started from the main
thread it also gets PR_SET_PDEATHSIG so that a runner killed with -9 leaves no orphan behind.
All waits are bounded. Set CITYHALL_TEST_KEEP=1 to keep temp folders for a post-mortem.
"""

import atexit
import base64
import ctypes
import datetime
import hashlib
import hmac
import uuid
import json as _json
import os
import pwd
import re
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("CITYHALL_BUILD") or os.path.join(ROOT, "build")
PG_BIN = "/usr/lib/postgresql/15/bin"
PG_USER = "postgres"


class Skip(Exception):
    """Raised by a test (or the runner) to report the test as skipped, with a reason."""


class CurlError(Exception):
    """curl exited without an HTTP response; .rc is curl's exit code (7: connection refused,
    28: timeout, 52: empty reply, 56: receive failure, 92: HTTP/2 stream error)."""

    def __init__(self, rc, stderr, args):
        super().__init__(f"curl exit {rc}: {stderr.strip()} ({' '.join(args)})")
        self.rc = rc
        self.stderr = stderr


def gateway_binary():
    """The path of build/cityhall (it may not exist yet)."""
    return os.path.join(BUILD, "cityhall")


# --------------------------------------------------------------------------- small helpers

_handed_ports = set()
_port_lock = threading.Lock()


def free_port():
    """A TCP port free on 127.0.0.1 right now, below the kernel's ephemeral range (so a client
    connection's local port cannot take it while a server is down between kill and restart)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    with _port_lock:
        for _ in range(200):
            port = random.randint(15000, max(15001, low - 1))
            if port in _handed_ports:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            finally:
                s.close()
            _handed_ports.add(port)
            return port
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        _handed_ports.add(port)
        return port


def wait_for(predicate, timeout=5.0, interval=0.05, what="condition"):
    """Calls predicate() until it returns something truthy and returns that; raises
    AssertionError naming `what` (and the last value or exception) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except (AssertionError, CurlError, OSError) as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def _tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def _die_with_parent():
    # Runs in the child between fork and exec: PR_SET_PDEATHSIG (1) = SIGKILL.
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def _spawn(cmd, log_path, env=None, user=None, cwd=None):
    """Starts cmd in its own session with stdout and stderr appended to log_path."""
    log = open(log_path, "ab")
    try:
        kw = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        if threading.current_thread() is threading.main_thread():
            # The death signal goes with the thread that forked: only safe from the main thread.
            kw["preexec_fn"] = _die_with_parent
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                cwd=cwd, start_new_session=True, close_fds=True, **kw)
    finally:
        log.close()


def _children(pid):
    """PIDs whose parent is pid (from /proc)."""
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            kids.append(int(name))
    return kids


def _proc_state(pid):
    """The one-letter state of pid ('R', 'S', 'T', 'Z', ...) or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid):
    return _proc_state(pid) not in (None, "Z", "X")


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_pids_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return not any(_alive(p) for p in pids)


def _stop_pids(pids, timeout=5.0):
    """Waits until every pid has stopped (state T), bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_proc_state(p) in ("T", "t", None, "Z") for p in pids):
            return
        time.sleep(0.01)
    raise AssertionError(f"processes {pids} did not stop within {timeout}s")


def _make_traversable(path):
    """Lets the postgres user walk through path (tempfile folders are 0700 root)."""
    mode = os.stat(path).st_mode & 0o777
    if not mode & 0o001:
        os.chmod(path, mode | 0o711)


# Live processes and folders, cleaned up at exit if their owner did not.
_live = []
_live_lock = threading.Lock()


def _register(obj):
    with _live_lock:
        if obj not in _live:
            _live.append(obj)


def _unregister(obj):
    with _live_lock:
        if obj in _live:
            _live.remove(obj)


@atexit.register
def _cleanup_at_exit():
    with _live_lock:
        objs = list(reversed(_live))
    for obj in objs:  # newest first: gateways before the servers they use
        try:
            obj._emergency_stop()
        except Exception:
            pass


_session = {}


def _session_dir():
    """A temp folder for this process (TLS cert, PostgreSQL template), removed at exit."""
    if "dir" not in _session:
        d = tempfile.mkdtemp(prefix="cityhall-session-")
        os.chmod(d, 0o711)
        _session["dir"] = d
        if not os.environ.get("CITYHALL_TEST_KEEP"):
            atexit.register(shutil.rmtree, d, True)
    return _session["dir"]


def tls_cert():
    """(cert_path, key_path): a self-signed P-256 certificate for 127.0.0.1 and localhost,
    generated once per process."""
    with _live_lock:
        if "tls" not in _session:
            d = os.path.join(_session_dir(), "tls")
            os.makedirs(d, exist_ok=True)
            cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                check=True, capture_output=True, timeout=30)
            os.chmod(key, 0o600)
            _session["tls"] = (cert, key)
        return _session["tls"]


# --------------------------------------------------------------------------- PostgreSQL

def _pg_template():
    """A cleanly shut down cluster with database cityhall, made once per process; each Postgres
    copies it (cp -a) instead of running initdb again (initdb costs ~2 s, a copy ~0.2 s)."""
    with _live_lock:
        if "pg" in _session:
            return _session["pg"]
        base = os.path.join(_session_dir(), "pg-template")
        data, sock = os.path.join(base, "data"), os.path.join(base, "sock")
        os.makedirs(sock)
        os.makedirs(data, mode=0o700)
        os.chmod(base, 0o711)
        pw = pwd.getpwnam(PG_USER)
        os.chown(sock, pw.pw_uid, pw.pw_gid)
        os.chown(data, pw.pw_uid, pw.pw_gid)
        r = subprocess.run(
            ["runuser", "-u", PG_USER, "--", f"{PG_BIN}/initdb", "-D", data, "--data-checksums",
             "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stdout}{r.stderr}")
        log = os.path.join(base, "postgres.log")
        proc = _spawn([f"{PG_BIN}/postgres", "-D", data, "-k", sock, "-c", "listen_addresses=",
                       "-c", "fsync=off"], log, user=PG_USER, cwd=data)
        try:
            wait_for(lambda: proc.poll() is not None or subprocess.run(
                [f"{PG_BIN}/pg_isready", "-q", "-h", sock, "-t", "1"], timeout=5).returncode == 0,
                timeout=30, what="template postgres")
            if proc.poll() is not None:
                raise RuntimeError(f"template postgres exited:\n{_tail(log)}")
            subprocess.run(["psql", "-X", "-q", "-h", sock, "-U", "postgres", "-d", "postgres",
                            "-c", "create database cityhall"], check=True, capture_output=True,
                           timeout=30)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        _session["pg"] = data
        return data


class Postgres:
    """A PostgreSQL 15 cluster in tmpdir/pg owned by the postgres user, listening on 127.0.0.1 at
    a free port with fsync on; started on construction unless start=False."""

    def __init__(self, tmpdir, start=True):
        self.tmpdir = tmpdir
        self.datadir = os.path.join(tmpdir, "pg")
        self.sockdir = os.path.join(tmpdir, "pg-sock")
        self.logpath = os.path.join(tmpdir, "postgres.log")
        self.port = free_port()
        self.proc = None
        self._paused = []
        _make_traversable(tmpdir)
        template = _pg_template()
        subprocess.run(["cp", "-a", template, self.datadir], check=True, timeout=60)
        os.makedirs(self.sockdir, exist_ok=True)
        pw = pwd.getpwnam(PG_USER)
        os.chown(self.sockdir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.sockdir, 0o755)
        if start:
            self.start()

    @property
    def conninfo(self):
        """libpq connection string for database cityhall as user postgres over TCP."""
        return f"host=127.0.0.1 port={self.port} dbname=cityhall user=postgres"

    @property
    def pid(self):
        """The postmaster's PID (None when not running)."""
        return self.proc.pid if self.running else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=30):
        """Starts the postmaster (crash recovery included) and waits until it accepts connections."""
        if self.running:
            return
        self.proc = _spawn([f"{PG_BIN}/postgres", "-D", self.datadir, "-p", str(self.port),
                            "-k", self.sockdir, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on",
                            "-c", "max_connections=200"],
                           self.logpath, user=PG_USER, cwd=self.datadir)
        _register(self)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{_tail(self.logpath)}")
            return subprocess.run([f"{PG_BIN}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port),
                                   "-d", "cityhall", "-t", "1"], timeout=5).returncode == 0

        try:
            wait_for(ready, timeout=timeout, interval=0.05, what=f"postgres on port {self.port}")
        except BaseException:
            self._emergency_stop()
            raise

    def stop(self, mode="fast", timeout=30):
        """Stops by PID: mode 'smart' (SIGTERM), 'fast' (SIGINT) or 'immediate' (SIGQUIT, crash
        recovery at the next start). Waits for the postmaster and its children; returns the
        postmaster's exit code (None if it was not running)."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        if not self.running:
            return None
        self.resume()
        kids = _children(self.proc.pid)
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._emergency_stop()
            raise AssertionError(f"postgres did not stop ({mode}) within {timeout}s; killed")
        if not _wait_pids_gone(kids, 10):
            for k in kids:
                _signal(k, signal.SIGKILL)
            _wait_pids_gone(kids, 5)
        _unregister(self)
        return rc

    def pause(self):
        """SIGSTOPs the postmaster, then each of its children, by PID: every query and every
        new connection hangs until resume()."""
        if not self.running or self._paused:
            return
        pid = self.proc.pid
        os.kill(pid, signal.SIGSTOP)  # first, so that it forks no child we would miss
        kids = _children(pid)
        for k in kids:
            _signal(k, signal.SIGSTOP)
        self._paused = [pid] + kids
        _stop_pids(self._paused)

    def resume(self):
        """SIGCONTs what pause() stopped."""
        pids, self._paused = self._paused, []
        for p in reversed(pids):
            _signal(p, signal.SIGCONT)

    def psql(self, sql, timeout=30):
        """Runs sql with `psql -At` as user postgres in database cityhall; returns its output
        without the final newline; raises RuntimeError on error."""
        r = subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                            "-p", str(self.port), "-U", "postgres", "-d", "cityhall", "-c", sql],
                           capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, PGCONNECT_TIMEOUT="5"))
        if r.returncode != 0:
            raise RuntimeError(f"psql failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout

    def _emergency_stop(self):
        if self.proc is None:
            return
        pids = self._paused or []
        self._paused = []
        for p in pids:
            _signal(p, signal.SIGCONT)
        if self.proc.poll() is None:
            kids = _children(self.proc.pid)
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            for k in kids:
                _signal(k, signal.SIGKILL)
        _unregister(self)


# --------------------------------------------------------------------------- Redis

class Redis:
    """redis-server on 127.0.0.1 at a free port, AOF on (appendfsync everysec), data in
    tmpdir/redis; started on construction unless start=False. start() reuses the same port."""

    def __init__(self, tmpdir, start=True):
        self.tmpdir = tmpdir
        self.dir = os.path.join(tmpdir, "redis")
        self.logpath = os.path.join(tmpdir, "redis.log")
        self.port = free_port()
        self.proc = None
        self._paused = False
        os.makedirs(self.dir, exist_ok=True)
        if start:
            self.start()

    @property
    def pid(self):
        return self.proc.pid if self.running else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=15):
        """Starts redis-server (reloading its AOF) and waits until it answers PING."""
        if self.running:
            return
        self.proc = _spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                            "--dir", self.dir, "--appendonly", "yes", "--appendfsync", "everysec",
                            "--save", "", "--daemonize", "no", "--logfile", ""],
                           self.logpath)
        _register(self)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{_tail(self.logpath)}")
            return self.ping()

        try:
            wait_for(ready, timeout=timeout, interval=0.02, what=f"redis on port {self.port}")
        except BaseException:
            self._emergency_stop()
            raise

    def ping(self, timeout=1.0):
        """True if Redis answers PING with PONG within timeout."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def cli(self, *args, timeout=10):
        """Runs redis-cli against this server; returns its output stripped."""
        r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *map(str, args)],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip()

    def dump(self):
        """Every key and its value (string, hash, list, set or sorted set), as one text: for leak checks."""
        keys = [k for k in self.cli("--scan").split() if k]
        read = {"string": ("GET",), "hash": ("HGETALL",), "list": ("LRANGE", 0, -1), "set": ("SMEMBERS",),
                "zset": ("ZRANGE", 0, -1)}
        values = []
        for key in keys:
            cmd = read.get(self.cli("TYPE", key))
            if cmd:
                values.append(self.cli(cmd[0], key, *cmd[1:]))
        return "\n".join(keys + values)

    def stop(self, timeout=15):
        """SIGTERM by PID (Redis flushes its AOF and exits); returns the exit code."""
        if not self.running:
            return None
        self.resume()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"redis did not stop within {timeout}s; killed")
        _unregister(self)
        return rc

    def kill(self):
        """SIGKILL by PID, as a crash would."""
        if not self.running:
            return
        self._paused = False
        self.proc.kill()
        self.proc.wait(10)
        _unregister(self)

    def pause(self):
        """SIGSTOP by PID: connections stay open, nothing is answered until resume()."""
        if self.running and not self._paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self._paused = True
            _stop_pids([self.proc.pid])

    def resume(self):
        if self.running and self._paused:
            os.kill(self.proc.pid, signal.SIGCONT)
        self._paused = False

    def _emergency_stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        _unregister(self)


# --------------------------------------------------------------------------- the gateway

class Gateway:
    """build/cityhall serve configured only through its environment (no file is written):
    free http (h2c + HTTP/1.1) and https (h2 + HTTP/1.1 over TLS) ports, the session's TLS cert,
    the given PostgreSQL and Redis, CITYHALL_VAR=tmpdir/var, stderr in tmpdir/gateway.log.
    `env` entries override the defaults (values are converted with str()). `build/cityhall
    keys init` and `build/cityhall migrate` run once before the first start. Started on
    construction unless start=False."""

    def __init__(self, tmpdir, pg, redis, threads=2, env=None, start=True):
        self.tmpdir = tmpdir
        self.pg, self.redis = pg, redis
        self.logpath = os.path.join(tmpdir, "gateway.log")
        self.binary = gateway_binary()
        if not os.access(self.binary, os.X_OK):
            raise Skip(f"{self.binary} is not built")
        cert, key = tls_cert()
        var = os.path.join(tmpdir, "var")
        os.makedirs(var, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CITYHALL_")}
        self.env.update({
            "CITYHALL_VAR": var,
            "CITYHALL_LISTEN": "127.0.0.1",
            "CITYHALL_HTTP_PORT": str(free_port()),
            "CITYHALL_HTTPS_PORT": str(free_port()),
            "CITYHALL_THREADS": str(threads),
            "CITYHALL_TLS_CERT": cert,
            "CITYHALL_TLS_KEY": key,
            "CITYHALL_PG_CONNINFO": pg.conninfo,
            "CITYHALL_REDIS_HOST": "127.0.0.1",
            "CITYHALL_REDIS_PORT": str(redis.port),
        })
        self.env.update({k: str(v) for k, v in (env or {}).items()})
        self.http_port = int(self.env["CITYHALL_HTTP_PORT"])
        self.https_port = int(self.env["CITYHALL_HTTPS_PORT"])
        self.threads = int(self.env["CITYHALL_THREADS"])
        self.proc = None
        self.migrated = False
        self.keys_ready = False
        self._final_log = None
        _started_gateways.append(self)
        if start:
            self.start()

    @property
    def pid(self):
        return self.proc.pid if self.running else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def url(self, path="/", tls=False):
        """http://127.0.0.1:<http_port><path>, or https://... when tls."""
        if tls:
            return f"https://127.0.0.1:{self.https_port}{path}"
        return f"http://127.0.0.1:{self.http_port}{path}"

    def request(self, path, method="GET", http="h2c", tls=None, **kw):
        """curl() against this gateway: h2 goes to the TLS listener, h2c and h1 to the cleartext
        one unless tls=True. Other keywords go to curl()."""
        if tls is None:
            tls = http == "h2"
        return curl(self.url(path, tls=tls), method=method, http=http, **kw)

    def run(self, *args, timeout=120):
        """Runs `build/cityhall <args>` with this gateway's environment; returns the
        CompletedProcess (text, stdout and stderr captured)."""
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def migrate(self):
        """Runs `build/cityhall migrate`; raises RuntimeError if it fails."""
        r = self.run("migrate")
        if r.returncode != 0:
            raise RuntimeError(f"cityhall migrate exited {r.returncode}:\n{r.stdout}{r.stderr}")
        self.migrated = True
        return r

    def keys_init(self):
        """Runs `build/cityhall keys init` (data key and signing keys in CITYHALL_VAR/keys, only
        what is missing); raises RuntimeError if it fails."""
        r = self.run("keys", "init")
        if r.returncode != 0:
            raise RuntimeError(f"cityhall keys init exited {r.returncode}:\n{r.stdout}{r.stderr}")
        self.keys_ready = True
        return r

    def start(self, timeout=15):
        """Starts `cityhall serve` and waits until GET /healthz answers 200 (over h2c, or over h2
        when the cleartext listener is disabled)."""
        if self.running:
            return
        if not self.keys_ready:
            self.keys_init()
        if not self.migrated:
            self.migrate()
        self.proc = _spawn([self.binary, "serve"], self.logpath, env=self.env)
        _register(self)
        tls = self.http_port == 0

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"cityhall serve exited with {self.proc.returncode}:\n"
                                   f"{_tail(self.logpath)}")
            try:
                return self.request("/healthz", http="h2" if tls else "h2c", timeout=1).status == 200
            except CurlError:
                return False

        try:
            wait_for(ready, timeout=timeout, interval=0.05, what="cityhall /healthz")
        except AssertionError as e:
            self._emergency_stop()
            raise AssertionError(f"{e}\ngateway log:\n{_tail(self.logpath, 30)}") from None
        except BaseException:
            self._emergency_stop()
            raise

    def terminate(self):
        """Sends SIGTERM (graceful shutdown) by PID and returns at once; see wait()."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout=30):
        """Waits for the process to exit; returns its exit code (negative: killed by a signal).
        Raises AssertionError if it is still running after timeout."""
        if self.proc is None:
            return None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"cityhall did not exit within {timeout}s")
        _unregister(self)
        return rc

    def stop(self, timeout=30):
        """SIGTERM + wait; returns the exit code. Killed (and AssertionError) after timeout."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.wait(timeout)
        except AssertionError:
            self._emergency_stop()
            raise

    def kill(self):
        """SIGKILL by PID, as a crash would."""
        if self.running:
            self.proc.kill()
            self.proc.wait(10)
        _unregister(self)

    def log_text(self):
        """Everything the gateway wrote to stderr/stdout so far (kept after the folder is gone)."""
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return self._final_log or ""

    def log_json(self):
        """The log lines that parse as JSON objects, in order."""
        out = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(_json.loads(line))
                except ValueError:
                    pass
        return out

    def _emergency_stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        _unregister(self)


_started_gateways = []


def started_gateways():
    """Every Gateway created in this process, oldest first (the runner prints their logs)."""
    return list(_started_gateways)


class Cluster:
    """PostgreSQL + Redis + gateway in one temp folder. As a context manager it stops everything
    by PID and removes the folder on exit, whatever happened inside.

        with Cluster(env={"CITYHALL_MAX_BODY_BYTES": 4096}) as c:
            r = c.gateway.request("/v1/system/info")
    """

    def __init__(self, threads=2, env=None, gateway=True):
        self.threads, self.env, self.want_gateway = threads, env, gateway
        self.tmpdir = None
        self.pg = self.redis = self.gateway = None

    def start(self):
        self.tmpdir = tempfile.mkdtemp(prefix="cityhall-test-")
        os.chmod(self.tmpdir, 0o711)
        _register(self)
        try:
            self.pg = Postgres(self.tmpdir)
            self.redis = Redis(self.tmpdir)
            if self.want_gateway:
                self.gateway = Gateway(self.tmpdir, self.pg, self.redis, threads=self.threads,
                                       env=self.env)
        except BaseException:
            self.close()
            raise
        return self

    def ensure_running(self):
        """Resumes paused servers and restarts stopped ones (used between tests)."""
        for srv in (self.pg, self.redis):
            if srv is not None:
                srv.resume()
                if not srv.running:
                    srv.start()
        if self.gateway is not None and not self.gateway.running:
            self.gateway.start()

    def close(self):
        """Stops the gateway, Redis and PostgreSQL by PID, then removes the folder."""
        errors = []
        for srv in (self.pg, self.redis):  # a test may have failed with a server paused
            if srv is not None:
                srv.resume()
        if self.gateway is not None:
            try:
                if self.gateway.running:
                    self.gateway.stop(timeout=10)
            except Exception as e:
                errors.append(e)
            self.gateway._emergency_stop()
            self.gateway._final_log = self.gateway.log_text()
        if self.redis is not None:
            self.redis._emergency_stop()
        if self.pg is not None:
            try:
                self.pg.stop("fast", timeout=15)
            except Exception as e:
                errors.append(e)
            self.pg._emergency_stop()
        if self.tmpdir and os.path.isdir(self.tmpdir):
            if os.environ.get("CITYHALL_TEST_KEEP"):
                print(f"# kept {self.tmpdir}")
            else:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        _unregister(self)

    def _emergency_stop(self):
        self.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False


# --------------------------------------------------------------------------- curl

class Response:
    """An HTTP response as curl saw it."""

    def __init__(self, status, headers, body, http_version, header_list):
        self.status = status
        self.headers = headers          # lower-case name -> value (repeated ones joined by ", ")
        self.header_list = header_list  # [(lower-case name, value)] in order
        self.body = body
        self.http_version = http_version  # "2", "1.1"

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        """The body parsed as JSON; AssertionError (with the body) if it is not JSON."""
        try:
            return _json.loads(self.body)
        except ValueError as e:
            raise AssertionError(f"body is not JSON ({e}): {self.body[:300]!r}")

    def __repr__(self):
        return (f"<Response {self.status} HTTP/{self.http_version} "
                f"{self.headers.get('content-type', '')} {self.body[:300]!r}>")


class CurlCall:
    """A curl process running in the background; wait() returns its Response."""

    def __init__(self, args, want_version, timeout, tmpfiles):
        self.args, self.want_version, self.timeout, self._tmp = args, want_version, timeout, tmpfiles
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._result = None

    def wait(self):
        """Waits (bounded by the request's timeout + 5 s) and returns the Response; raises
        CurlError when there was no HTTP response."""
        if self._result is not None:
            return self._result
        try:
            out, err = self.proc.communicate(timeout=self.timeout + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        finally:
            hdr_text = ""
            try:
                with open(self._tmp[0], "rb") as f:
                    hdr_text = f.read().decode("iso-8859-1")
            except OSError:
                pass
            for p in self._tmp:
                try:
                    os.unlink(p)
                except OSError:
                    pass
        err = err.decode("utf-8", "replace")
        marker = [ln for ln in err.splitlines() if ln.startswith("@@CURL ")]
        msg = "\n".join(ln for ln in err.splitlines() if ln and not ln.startswith("@@CURL "))
        if self.proc.returncode != 0 or not marker:
            raise CurlError(self.proc.returncode, msg, self.args)
        _, code, version = marker[-1].split(" ", 2)
        # The header file holds one block per response (100 Continue first); keep the last.
        blocks = [b for b in hdr_text.replace("\r\n", "\n").split("\n\n") if b.strip()]
        header_list = []
        for line in (blocks[-1].split("\n")[1:] if blocks else []):
            if ":" in line:
                k, v = line.split(":", 1)
                header_list.append((k.strip().lower(), v.strip()))
        headers = {}
        for k, v in header_list:
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        resp = Response(int(code), headers, out, version.strip(), header_list)
        if self.want_version and resp.http_version != self.want_version:
            raise AssertionError(f"expected HTTP/{self.want_version} but curl negotiated "
                                 f"HTTP/{resp.http_version} for {self.args[-1]}")
        self._result = resp
        return resp


def curl_async(url, method="GET", http="h2c", headers=None, data=None, timeout=10, json=None):
    """Starts curl in the background; see curl()."""
    if http not in ("h2c", "h2", "h1"):
        raise ValueError(f"http must be h2c, h2 or h1, not {http!r}")
    if http == "h2" and not url.startswith("https:"):
        raise ValueError("http='h2' needs an https:// URL (ALPN)")
    tmpdir = _session_dir()
    fd, hdr_path = tempfile.mkstemp(prefix="curl-h-", dir=tmpdir)
    os.close(fd)
    tmpfiles = [hdr_path]
    args = ["curl", "-sS", "-k", "--max-time", str(timeout), "--connect-timeout", str(min(timeout, 5)),
            "-D", hdr_path, "-o", "-", "-w", "%{stderr}\n@@CURL %{http_code} %{http_version}\n"]
    args.append({"h2c": "--http2-prior-knowledge", "h2": "--http2", "h1": "--http1.1"}[http])
    hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if json is not None:
        data = _json.dumps(json).encode()
        if not any(k.lower() == "content-type" for k, _ in hdrs):
            hdrs.append(("Content-Type", "application/json"))
    if data is not None:
        if isinstance(data, str):
            data = data.encode()
        fd, body_path = tempfile.mkstemp(prefix="curl-b-", dir=tmpdir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmpfiles.append(body_path)
        args += ["--data-binary", "@" + body_path]
        if not any(k.lower() == "content-type" for k, _ in hdrs):
            hdrs.append(("Content-Type", "application/json"))
    if method == "HEAD":
        args.append("--head")
    elif method != "GET" or data is not None:
        args += ["-X", method]
    for k, v in hdrs:
        args += ["-H", f"{k}: {v}" if v != "" else f"{k};"]
    args.append(url)
    return CurlCall(args, "2" if http in ("h2", "h2c") else "1.1", timeout, tmpfiles)


def curl(url, method="GET", http="h2c", headers=None, data=None, timeout=10, json=None):
    """One request with the curl CLI; returns a Response for any HTTP status and raises
    CurlError when there is none (refused, reset, timed out).

    http: 'h2c' (--http2-prior-knowledge), 'h2' (https with --http2; AssertionError unless ALPN
    negotiated h2) or 'h1' (--http1.1). headers: dict or [(name, value)]. data: bytes or str sent
    as the body (Content-Type defaults to application/json); json: an object sent as JSON.
    TLS certificates are not verified (-k)."""
    return curl_async(url, method, http, headers, data, timeout, json).wait()


# --------------------------------------------------------------------------- callers: citizens, staff, clients

def totp(secret_b32, step=0, at=None):
    """RFC 6238 (HMAC-SHA1, 30 s steps, 6 digits) at time `at` (now by default), moved by `step` steps."""
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    counter = int((time.time() if at is None else at) // 30) + step
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    off = mac[-1] & 15
    return "%06d" % ((struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF) % 1000000)


def printed_fields(stdout):
    """The `  name:  value` lines a cityhall command prints (credentials shown once), as a dict."""
    return dict(re.findall(r"^\s+([a-z ]+):\s+(\S+)$", stdout, re.M))


def staff_add(gw, dept="health", hall="tianhe-hall", roles=None, username=None):
    """`cityhall staff add` (a new username unless given): {username, password, secret, staff_id, dept, hall, out}."""
    username = username or "h" + os.urandom(6).hex()
    args = ["staff", "add", "--username", username, "--dept", dept, "--hall", hall]
    if roles:
        args += ["--roles", roles]
    r = gw.run(*args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    fields = printed_fields(r.stdout)
    staff_id = gw.pg.psql(f"SELECT staff_id FROM staff_accounts WHERE username = '{username}'")
    return {"username": username, "password": fields["password"], "secret": fields["totp secret"],
            "staff_id": staff_id, "dept": dept, "hall": hall, "out": r.stdout}


def staff_token(gw, dept="health", hall="tianhe-hall", roles=None, step=0):
    """A new staff account, logged in with POST /v1/staff/login: staff_add's dict + token and login."""
    acct = staff_add(gw, dept, hall, roles)
    r = gw.request("/v1/staff/login", method="POST", json={
        "username": acct["username"], "password": acct["password"], "totp": totp(acct["secret"], step)})
    assert r.status == 200, r
    return dict(acct, token=r.json()["access_token"], login=r.json())


def admin_token(gw):
    """An admin's access token (`cityhall staff add --roles admin`, dept platform), made once per gateway."""
    if getattr(gw, "_admin", None) is None or gw._admin[1] < time.time() + 60:
        t = staff_token(gw, dept="platform", roles="admin")
        assert t["login"]["role"] == "admin", t["login"]
        gw._admin = (t["token"], time.time() + t["login"]["expires_in"])
    return gw._admin[0]


def client_add(gw, dept="health"):
    """`cityhall client add` with a new client id: {client_id, secret, dept, out}."""
    client_id = "c-" + os.urandom(5).hex()
    r = gw.run("client", "add", "--client-id", client_id, "--dept", dept)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return {"client_id": client_id, "secret": printed_fields(r.stdout)["client secret"], "dept": dept, "out": r.stdout}


def client_token(gw, dept="health"):
    """A new department client and its dept token (POST /v1/auth/client-token): client_add's dict + token, until."""
    c = client_add(gw, dept)
    r = gw.request("/v1/auth/client-token", method="POST", json={"client_id": c["client_id"], "client_secret": c["secret"]})
    assert r.status == 200, r
    return dict(c, token=r.json()["access_token"], until=time.time() + r.json()["expires_in"])


def sms_codes(gw, phone):
    """The codes the development SMS outbox (CITYHALL_VAR/sms-outbox.jsonl) holds for phone, oldest first."""
    try:
        with open(os.path.join(gw.env["CITYHALL_VAR"], "sms-outbox.jsonl")) as f:
            msgs = [_json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return [m["code"] for m in msgs if m.get("phone") == phone and "code" in m]


def wait_sms_code(gw, phone, before=0):
    """Waits (5 s at most) for a code beyond the first `before` codes of phone in the outbox and returns the newest."""
    return wait_for(lambda: sms_codes(gw, phone)[before:], timeout=5, what="the SMS code")[-1]


def data_key(gw):
    """The gateway's data key file (pii.h): (AES-256-GCM key, HMAC-SHA-256 key)."""
    with open(os.path.join(gw.env["CITYHALL_VAR"], "keys", "data.key")) as f:
        raw = bytes.fromhex(f.read().strip())
    return raw[:32], raw[32:64]


def keyed_hash(gw, domain, value):
    """ch_pii_hmac: HMAC-SHA-256 over domain || 0x00 || value with the data key's MAC half, as hex."""
    return hmac.new(data_key(gw)[1], domain.encode() + b"\0" + value.encode(), hashlib.sha256).hexdigest()


def sms_lift_limits(gw, phone):
    """Deletes the per-IP SMS counters and the phone's own keys (id:ip:*, id:{<keyed hash>}:*) from Redis."""
    keys = [k for k in gw.redis.cli("--scan", "--pattern", "id:ip:*").split() if k]
    keys += [k for k in gw.redis.cli("--scan", "--pattern", f"id:{{{keyed_hash(gw, 'phone', phone)}}}:*").split() if k]
    if keys:
        gw.redis.cli("DEL", *keys)


def id_hmac(gw, number):
    """The registry's look-up hash of an ID number (HMAC-SHA-256 under the data key's MAC half), as hex."""
    return keyed_hash(gw, "id", number)


def same_household(gw, citizen_id, *id_numbers):
    """Registers the citizen's own resident and the residents with these ID numbers in one new household (户号):
    the family link a dependent needs."""
    hashes = ",".join(f"decode('{id_hmac(gw, n)}', 'hex')" for n in id_numbers)
    gw.pg.psql(f"UPDATE registry_residents SET household_id = 'T-{uuid.uuid4().hex[:16]}' "
               f"WHERE resident_id = (SELECT registry_id FROM citizens WHERE citizen_id = '{citizen_id}') "
               f"OR id_hmac IN ({hashes})")


def sms_login(gw, phone=None):
    """A citizen's SMS login (a new random phone by default) through the development outbox, the send limits
    lifted first; returns the TokenResponse dict with `phone` and `token` (the access token) added."""
    phone = phone or "199" + "".join(random.choice("0123456789") for _ in range(8))
    sms_lift_limits(gw, phone)
    before = len(sms_codes(gw, phone))
    r = gw.request("/v1/auth/sms-code", method="POST", json={"phone": phone})
    assert r.status == 202, r
    r = gw.request("/v1/auth/login", method="POST", json={"phone": phone, "code": wait_sms_code(gw, phone, before)})
    assert r.status == 200, r
    return dict(r.json(), phone=phone, token=r.json()["access_token"])


def bind_real_name(gw, token, id_number, name):
    """POST /v1/me/real-name for the citizen with this access token, asserting 200; returns the answer's JSON."""
    r = gw.request("/v1/me/real-name", method="POST", json={"id_number": id_number, "name": name},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200, r
    return r.json()


def assert_error(resp, status, code=None, message=None, hidden=()):
    """DESIGN's error shape: the status, a JSON {"error": {code, message, request_id}} with request_id = x-request-id,
    the code (any when None), `message` in the message, Retry-After on 429/503, none of `hidden` in the body."""
    assert resp.status == status, f"expected {status}, got {resp!r}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], dict), body
    err = body["error"]
    assert err.get("code") == code if code is not None else isinstance(err.get("code"), str) and err["code"], body
    assert isinstance(err.get("message"), str) and err["message"], body
    assert err.get("request_id") and err["request_id"] == resp.headers.get("x-request-id"), (body, resp.headers)
    if message is not None:
        assert message in err["message"], body
    if status in (429, 503):
        assert re.match(r"^[1-9]\d*$", resp.headers.get("retry-after", "")), f"no Retry-After: {resp.headers}"
    for raw in hidden:
        assert raw not in resp.text, f"a raw personal number in an error body: {body}"
    return err


# --------------------------------------------------------------------------- synthetic residents of the registry

REGISTRY_HEADER = "id_number,name,sex,birth_date,region,address,household_id,phone"
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_SURNAMES = "赵钱孙李周吴郑王冯陈褚卫蒋沈韩杨朱秦尤许何吕施张孔曹严华金魏陶姜"
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍红"
_rng = random.SystemRandom()
_used_lock = threading.Lock()


def _claim(value, used):
    """Adds value to the set `used` and returns True, or False if it was there already (None: no set)."""
    with _used_lock:
        if used is not None and value in used:
            return False
        if used is not None:
            used.add(value)
        return True


def id_check_char(first17):
    """The GB 11643 check character of an ID number's first 17 digits."""
    return "10X98765432"[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS)) % 11]


def new_id_number(region, birth=None, sex=None, used=None, check=None):
    """A valid GB 11643 number of region, born on `birth` (a random day of 1960-1992 when None), with an odd
    sequence for sex "M", even for "F", any for None, and a check character in `check` (any when None); never one
    already in the set `used` (it is added there)."""
    while True:
        born = birth or datetime.date(1960, 1, 1) + datetime.timedelta(days=_rng.randrange(0, 12000))
        seq = _rng.randrange(0, 1000) if sex is None else _rng.randrange(0, 500) * 2 + (1 if sex == "M" else 0)
        first17 = f"{region}{born:%Y%m%d}{seq:03d}"
        number = first17 + id_check_char(first17)
        if (check is None or number[17] in check) and _claim(number, used):
            return number


def id_birth_date(number):
    """The birth date written in an ID number, as a datetime.date."""
    return datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))


def china_today():
    """Today's date in China (UTC+8), the day the services count ages and deadlines by."""
    return (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=8)).date()


def years_before(d, years):
    """The date `years` years before d (28 February for a 29 February)."""
    try:
        return d.replace(year=d.year - years)
    except ValueError:
        return d.replace(year=d.year - years, day=28)


def new_phone(used=None):
    """A random mainland mobile number (1[3-9] and 9 digits) never already in the set `used` (it is added there)."""
    while True:
        phone = "1" + _rng.choice("3456789") + "".join(_rng.choice("0123456789") for _ in range(9))
        if _claim(phone, used):
            return phone


def new_name(length=3):
    """A random Chinese full name of `length` characters: one surname, then given-name characters."""
    return _rng.choice(_SURNAMES) + "".join(_rng.choice(_GIVEN) for _ in range(length - 1))


def import_registry(gw, rows, header=REGISTRY_HEADER, check=True):
    """`cityhall import registry` of a CSV file: `header` (None: none), then rows, each a CSV line or a sequence of
    values (str() of each, joined by commas; a date gives YYYY-MM-DD). Asserts success when `check`; returns the
    CompletedProcess."""
    lines = ([header] if header is not None else []) + [
        r if isinstance(r, str) else ",".join(str(v) for v in r) for r in rows]
    fd, path = tempfile.mkstemp(prefix="registry-", suffix=".csv", dir=gw.tmpdir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    try:
        r = gw.run("import", "registry", path)
    finally:
        os.unlink(path)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def resident_id(gw, number):
    """The registry_residents.resident_id of the resident with this ID number."""
    return int(gw.pg.psql(f"SELECT resident_id FROM registry_residents WHERE id_hmac = decode('{id_hmac(gw, number)}', 'hex')"))


_shared = {}


def shared(cluster, key, make):
    """make() once per cluster and key; later calls return the same value (a logged-in caller, a seed's output)."""
    d = _shared.setdefault(cluster.tmpdir, {})
    if key not in d:
        d[key] = make()
    return d[key]


# --------------------------------------------------------------------------- protobuf wire format

class Fixed32(int):
    """Marks an int to be encoded as wire type 5 (fixed32/sfixed32/float bits)."""


class Fixed64(int):
    """Marks an int to be encoded as wire type 1 (fixed64/sfixed64/double bits)."""


def pb_varint(n):
    """Encodes n as a varint; a negative n as its 64-bit two's complement (int32/int64)."""
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_read_varint(data, pos=0):
    """Decodes a varint at data[pos:]; returns (value, new_pos); ValueError if truncated."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        if shift >= 70:
            raise ValueError("varint too long")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def _pb_field(no, value):
    if isinstance(value, Fixed32):
        return pb_varint(no << 3 | 5) + struct.pack("<I", value & 0xFFFFFFFF)
    if isinstance(value, Fixed64):
        return pb_varint(no << 3 | 1) + struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, (bool, int)):
        return pb_varint(no << 3) + pb_varint(int(value))
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, dict):
        value = pb_encode(value)
    if isinstance(value, (bytes, bytearray)):
        return pb_varint(no << 3 | 2) + pb_varint(len(value)) + bytes(value)
    raise TypeError(f"cannot encode field {no}: {value!r}")


def pb_encode(fields):
    """Encodes a message. fields: a dict {number: value} or a list of (number, value) pairs.
    value: int/bool (varint; negative as int64), str/bytes (length-delimited), dict (a nested
    message), Fixed32/Fixed64, or a list/tuple of those (a repeated field, one record each)."""
    items = fields.items() if isinstance(fields, dict) else fields
    out = bytearray()
    for no, value in items:
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            out += _pb_field(no, v)
    return bytes(out)


def pb_decode(data):
    """Decodes one message level: {number: [values...]} in wire order. Varints and fixed
    fields come back as unsigned ints (see pb_int64), length-delimited ones as bytes (decode a
    nested message with pb_decode again). ValueError on malformed input."""
    data = bytes(data)
    out = {}
    pos = 0
    while pos < len(data):
        key, pos = pb_read_varint(data, pos)
        no, wt = key >> 3, key & 7
        if no == 0:
            raise ValueError("field number 0")
        if wt == 0:
            value, pos = pb_read_varint(data, pos)
        elif wt == 1:
            if pos + 8 > len(data):
                raise ValueError("truncated fixed64")
            value = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
        elif wt == 2:
            n, pos = pb_read_varint(data, pos)
            if pos + n > len(data):
                raise ValueError("truncated length-delimited field")
            value = data[pos:pos + n]
            pos += n
        elif wt == 5:
            if pos + 4 > len(data):
                raise ValueError("truncated fixed32")
            value = struct.unpack_from("<I", data, pos)[0]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        out.setdefault(no, []).append(value)
    return out


def pb_int64(u):
    """An unsigned 64-bit varint value read as int64 (two's complement)."""
    return u - (1 << 64) if u >= 1 << 63 else u
