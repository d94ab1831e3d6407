"""What the python scenarios of loadtest/run share: access tokens minted as a login would issue them, many h2load
processes (one connection each) with the server's and the generator's CPU sampled while they run, and their
summaries. Standard library only."""

import base64
import glob
import json
import os
import re
import subprocess
import time

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def der_to_raw(der):
    """ECDSA-Sig-Value (SEQUENCE { INTEGER r, INTEGER s }) to 64 bytes r || s."""
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        out += der[i + 2:i + 2 + n].lstrip(b"\0").rjust(32, b"\0")
        i += 2 + n
    return out


def mint_access_token(var_dir, citizen_id, ttl=3600, sid=None):
    """An access token for `citizen_id` signed with the gateway's newest access key (as login would issue);
    `sid` defaults to the citizen id."""
    ring = os.path.join(var_dir, "keys", "access")
    kid = sorted(f[:-4] for f in os.listdir(ring) if f.endswith(".pem"))[-1]
    now = int(time.time())
    head = b64(json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": kid}, separators=(",", ":")).encode())
    claims = {"iss": "cityhall", "aud": "cityhall-api", "iat": now, "exp": now + ttl, "sub": citizen_id,
              "sid": sid or citizen_id, "role": "citizen", "jti": b64(os.urandom(16))}
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", os.path.join(ring, kid + ".pem")],
                         input=f"{head}.{body}".encode(), capture_output=True, check=True).stdout
    return f"{head}.{body}.{b64(der_to_raw(der))}"


def cpu_seconds(pid, descendants=True):
    """utime + stime of a process (and, by default, of its descendants), in seconds."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        except OSError:
            continue
        if descendants:
            for t in glob.glob(f"/proc/{p}/task/*/children"):
                try:
                    with open(t) as f:
                        todo += [int(x) for x in f.read().split()]
                except OSError:
                    pass
    return total


def idle_seconds():
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return (int(parts[4]) + int(parts[5])) / _CLK_TCK


def run_h2loads(url, jobs, streams, duration, warmup, log_dir=None, server_pids=None):
    """One h2load per job (1 connection, `streams` streams; a job is the process's own arguments, e.g. its token
    header). Returns (texts, cpu dict or None); the CPU is sampled over the measured part when server_pids is
    given ({name: pid})."""
    procs = []
    for i, extra in enumerate(jobs):
        cmd = ["h2load", "-c", "1", "-m", str(streams), "-t", "1", "-D", f"{round(duration * 1000)}ms",
               "--warm-up-time", f"{round(warmup * 1000)}ms", *extra]
        if log_dir:
            cmd.append(f"--log-file={os.path.join(log_dir, f'h2load-{i}.log')}")
        procs.append(subprocess.Popen(cmd + [url], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    cpu = None
    if server_pids is not None:
        time.sleep(warmup + 0.1)
        t0, i0 = time.monotonic(), idle_seconds()
        s0 = {k: cpu_seconds(p) for k, p in server_pids.items()}
        g0 = sum(cpu_seconds(p.pid, False) for p in procs)
        time.sleep(max(0.2, duration - 0.2))
        wall = time.monotonic() - t0
        s1 = {k: cpu_seconds(p) for k, p in server_pids.items()}
        g1 = sum(cpu_seconds(p.pid, False) for p in procs)
        idle = (idle_seconds() - i0) / wall
        parts = {k: (s1[k] - s0[k]) / wall for k in s0}
        srv, gen = sum(parts.values()), (g1 - g0) / wall
        cpu = {"server": round(srv, 2), "generator": round(gen, 2),
               "other": round(max(0.0, (os.cpu_count() or 1) - idle - srv - gen), 2), "idle": round(idle, 2)}
        cpu.update({"server." + k: round(v, 2) for k, v in parts.items()})
    texts = [p.communicate(timeout=duration + warmup + 60)[0].decode("utf-8", "replace") for p in procs]
    return texts, cpu


def summary(text):
    """rps, non2xx and protocol from one h2load's output."""
    m = re.search(r"^finished in ([0-9.]+)(m?s), ([0-9.]+) req/s", text, re.M)
    if not m:
        raise RuntimeError("h2load did not finish: " + " / ".join(text.strip().splitlines()[-4:]))
    out = {"rps": float(m.group(3)), "non2xx": 0}
    m = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                  r"(\d+) timeout", text, re.M)
    s = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    if m and s:
        out["non2xx"] = int(m.group(3)) - int(s.group(1)) + int(m.group(6)) + int(m.group(7))
    p = re.search(r"^Application protocol: (\S+)", text, re.M)
    out["protocol"] = p.group(1) if p else None
    return out


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]
