#!/usr/bin/python3
"""HTTP/2 abuse, the long form: every attack of attacks.py against a fresh gateway directly and through the edge
(ops/haproxy/run), with a baseline of the probe alone, printed as a Markdown table.

    /usr/bin/python3 tests/abuse/abuse.py --full [--seconds S]

Uses the build in $CITYHALL_BUILD (or build/) and production timeouts except idle 5 s and request 3 s, so
that slow clients end within the run. Loopback only; each attack is bounded by its count and S seconds.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import attacks  # noqa: E402
import harness  # noqa: E402

GATEWAY_ENV = {"CITYHALL_IDLE_TIMEOUT_MS": "5000", "CITYHALL_REQUEST_TIMEOUT_MS": "3000"}
EDGE_ENV = {"EDGE_TIMEOUT_CLIENT": "5s", "EDGE_TIMEOUT_REQUEST": "3s"}


def scenarios(seconds):
    s = seconds
    return [
        ("baseline (probe only)", None, {"seconds": s}),
        ("Rapid Reset, 1 conn", attacks.rapid_reset, {"streams": 300000, "seconds": s}),
        ("Rapid Reset, 4 conns", attacks.rapid_reset, {"streams": 300000, "seconds": s, "conns": 4}),
        ("CONTINUATION flood, empty, 4 conns", attacks.continuation_flood, {"seconds": s, "conns": 4}),
        ("CONTINUATION flood, 16 KB, 8 conns", attacks.continuation_flood, {"seconds": s, "conns": 8, "size": 16000}),
        ("3000 idle h2 connections (300/address)", attacks.idle_connections, {"count": 3000, "seconds": s, "per_ip": 300}),
        ("3000 idle TCP connections (300/address)", attacks.idle_connections,
         {"count": 3000, "seconds": s, "per_ip": 300, "preface": False}),
        ("slowloris headers, 200 conns", attacks.slow_headers, {"conns": 200, "seconds": s}),
        ("slowloris h2 body, 200 conns", attacks.slow_body, {"conns": 200, "seconds": s}),
        ("slow readers, 50 conns x 50 streams", attacks.slow_reader, {"conns": 50, "seconds": s}),
    ]


def cell(r):
    gw, p = r["gw"], r["probe"]
    return f"{gw.get('cpu_s', '-')} | {gw.get('rss_peak_mb', '-')} | {p['p99_ms']} | {p['errors']}/{p['n']}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="run every scenario (required)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each attack")
    args = ap.parse_args()
    if not args.full:
        ap.error("the short form is tests/abuse/test_h2_abuse.py (tests/run.py -k h2_abuse); pass --full")
    rows = []
    with harness.Cluster(env=GATEWAY_ENV) as c:
        gw = c.gateway
        edge = attacks.Edge(gw, EDGE_ENV).start()
        try:
            direct, via = attacks.Target(gw.http_port), edge.target
            for name, attack, kw in scenarios(args.seconds):
                out = []
                for target in (direct, via):
                    r = attacks.measure(attack, target, target, {"gw": gw.pid, "edge": edge.pid}, **kw)
                    if not gw.running:
                        sys.exit(f"the gateway died during {name}: {r}")
                    out.append(r)
                    print(f"# {name} {'via edge' if target is via else 'direct'}: {r}", file=sys.stderr, flush=True)
                rows.append((name, out))
        finally:
            edge.stop()
    print("| attack | direct: gateway CPU s | RSS MB (peak) | probe p99 ms | probe errors | "
          "via edge: gateway CPU s | RSS MB (peak) | probe p99 ms | probe errors | edge CPU s | edge RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (d, e) in rows:
        print(f"| {name} | {cell(d)} | {cell(e)} | {e['edge'].get('cpu_s', '-')} | {e['edge'].get('rss_peak_mb', '-')} |")
    print()
    for name, (d, e) in rows:
        if d["attack"]:
            print(f"- {name}: direct {d['attack']}; via edge {e['attack']}")


if __name__ == "__main__":
    main()
