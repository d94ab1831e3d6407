#!/usr/bin/python3
"""Runs every fault of the fault suite against one cluster of real PostgreSQL, Redis and gateway while client
threads write through the public API, and prints one table row per fault (see README.md).

    /usr/bin/python3 tests/faults/faults.py [--full] [-k SUBSTRING]

--full: 20 s SIGSTOPs, 10 s outages, longer load (about 8 minutes); without it, the short form of
tests/faults/test_faults.py (5 s pauses). The build directory is $CITYHALL_BUILD or build/. Exits 1 if any
fault broke an invariant, after printing what."""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import faultkit  # noqa: E402
import harness  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description="cityhall's fault suite: one table row per fault")
    ap.add_argument("--full", action="store_true", help="20 s pauses, 10 s outages, longer load")
    ap.add_argument("-k", dest="filter", default="", help="only faults whose name contains this")
    args = ap.parse_args()
    profile = faultkit.Profile(full=args.full)
    faults = [f for f in faultkit.FAULTS if args.filter in f[0]]
    results, broken = [], []
    t0 = time.monotonic()
    with harness.Cluster(threads=2) as cluster:
        for name, inject, kind in faults:
            print(f"# {name} ...", flush=True)
            try:
                res = faultkit.run_fault(cluster, name, inject, kind, profile)
            except harness.Skip as e:
                print(f"#   skipped: {e}", flush=True)
                continue
            results.append(res)
            bad = faultkit.violations(res, kind, profile)
            broken += [(name, b) for b in bad]
            print(f"#   {res['acked']}/{res['writes']} acknowledged, {res['attempts']} attempts, "
                  f"{res['s503']} x 503, recovery {res['recovery']:.1f}s" + (f", {res['note']}" if res["note"] else "")
                  + ("" if not bad else "; BROKEN: " + " | ".join(bad)), flush=True)
            cluster.ensure_running()
    print()
    print(faultkit.table(results))
    print(f"\n# {len(results)} faults in {time.monotonic() - t0:.0f}s ({'full' if args.full else 'short'} form)")
    for name, b in broken:
        print(f"BROKEN {name}: {b}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
