#!/usr/bin/python3
"""Runs every test of cityhall: the unit test binaries (TAP), then the Python suites.

    /usr/bin/python3 tests/run.py [-k SUBSTRING] [-v]

Unit tests are the test executables meson knows about (`meson introspect --tests`), or else
build/tests/**/test_*; each TAP line "ok N - name" / "not ok N - name" counts as one test.

Python suites are the functions `test_*(cluster)` of test_*.py in the folders of SUITES
(tests/integration, then the short forms of tests/faults, tests/abuse and tests/fuzz), run in
file order. Each module shares one harness.Cluster, started lazily and configured by an optional
module-level dict `CLUSTER = {"threads": 2, "env": {...}}`; a function without parameters gets
none (it starts its own). Between tests the shared cluster is brought back up if a test left a
server stopped or paused. A test raises harness.Skip("why") to be skipped. Each test is bounded
by an alarm (`TIMEOUT = seconds` in the module, default 120).

The build directory is $CITYHALL_BUILD or build/. Integration tests are skipped when
build/cityhall is missing, except with CI=true, where that is a failure.

Prints PASS/FAIL/SKIP per test (a failure with its message and the tail of the gateway log) and
ends with exactly one line "N passed, N failed, N skipped"; exits 1 if anything failed.
"""

import argparse
import glob
import importlib.util
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)

import harness  # noqa: E402

TAP_LINE = re.compile(r"^(not )?ok\b\s*(\d+)?\s*(?:-\s*)?(.*?)\s*(?:#\s*(SKIP|TODO)\b\s*(.*))?$", re.I)
TAP_PLAN = re.compile(r"^1\.\.(\d+)")
LOG_TAIL = 25
SUITES = ("integration", "faults", "abuse", "fuzz")


class Tally:
    def __init__(self, verbose):
        self.passed = self.failed = self.skipped = 0
        self.verbose = verbose

    def ok(self, name, seconds=None):
        self.passed += 1
        extra = f" ({seconds:.2f}s)" if self.verbose and seconds is not None else ""
        print(f"PASS {name}{extra}", flush=True)

    def fail(self, name, message, log=None):
        self.failed += 1
        print(f"FAIL {name}", flush=True)
        for line in message.rstrip().splitlines():
            print(f"    {line}")
        if log:
            print(f"    --- {log[0]} (last {LOG_TAIL} lines) ---")
            for line in log[1].rstrip().splitlines()[-LOG_TAIL:]:
                print(f"    | {line}")
        sys.stdout.flush()

    def skip(self, name, reason):
        self.skipped += 1
        print(f"SKIP {name}: {reason}", flush=True)


# --------------------------------------------------------------------------- unit tests

def unit_programs():
    """[(name, argv, env, workdir, timeout)] of the unit test executables in the build dir."""
    build = harness.BUILD
    if not os.path.isdir(build):
        return []
    try:
        r = subprocess.run(["meson", "introspect", "--tests", build], capture_output=True,
                           text=True, timeout=60)
        tests = json.loads(r.stdout) if r.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        tests = None
    out = []
    if tests is not None:
        for t in tests:
            env = dict(os.environ, **(t.get("env") or {}))
            timeout = t.get("timeout") or 60
            out.append((t["name"], t["cmd"], env, t.get("workdir"), timeout if timeout > 0 else 600))
        return out
    for path in sorted(glob.glob(os.path.join(build, "tests", "**", "test_*"), recursive=True)):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            out.append((os.path.basename(path), [path], dict(os.environ), None, 60))
    return out


def run_unit(tally, filt):
    for name, argv, env, workdir, timeout in unit_programs():
        label = f"unit/{name}"
        if not os.path.exists(argv[0]):
            if not filt or filt in label:
                tally.fail(label, f"{argv[0]} is not built (run ninja -C build)")
            continue
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                               cwd=workdir or None, stdin=subprocess.DEVNULL)
            output, rc = r.stdout, r.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            output, rc = out, f"timeout after {timeout}s"
            r = None
        lines = output.splitlines()
        seen, plan, pending = 0, None, None
        results = []  # [name, ok, directive, reason, diagnostics]
        for line in lines:
            m = TAP_LINE.match(line)
            if m:
                seen += 1
                results.append([f"{label}: {m.group(2) or seen} - {m.group(3)}", not m.group(1),
                                (m.group(4) or "").upper(), m.group(5) or "", []])
                pending = results[-1]
                continue
            m = TAP_PLAN.match(line)
            if m:
                plan = int(m.group(1))
                continue
            if line.startswith("#") and pending is not None:
                pending[4].append(line)
            if line.startswith("Bail out!"):
                results.append([f"{label}: bail out", False, "", "", [line]])
        for tname, ok, directive, reason, diag in results:
            if filt and filt not in tname:
                continue
            if directive == "SKIP":
                tally.skip(tname, reason or "skipped")
            elif ok or directive == "TODO":
                tally.ok(tname)
            else:
                tally.fail(tname, "\n".join(diag) or "not ok")
        if filt and filt not in label and not any(filt in t[0] for t in results):
            continue
        problems = []
        if isinstance(rc, str):
            problems.append(rc)
        elif rc < 0:
            problems.append(f"killed by signal {-rc}")
        elif rc != 0 and all(ok for _, ok, _, _, _ in results):
            problems.append(f"exit status {rc} although every check passed")
        if plan is None and not isinstance(rc, str):
            problems.append("no TAP plan line (1..N)")
        elif plan is not None and plan != seen:
            problems.append(f"planned {plan} tests, ran {seen}")
        if problems:
            tail = "\n".join(lines[-15:])
            err = (r.stderr[-2000:] if r is not None and r.stderr else "")
            tally.fail(f"{label}: program", "; ".join(problems) + ("\n" + tail if tail else "") +
                       ("\nstderr:\n" + err if err else ""))


# --------------------------------------------------------------------------- integration tests

class TestTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise TestTimeout("test exceeded its time limit")


def load_module(path):
    name = "integration_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def describe_failure(exc):
    """The assertion message and where it was raised (the innermost frame in a test file)."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = [f for f in tb if any(f"/{d}/" in f.filename for d in SUITES)]
    loc = f"{os.path.relpath(where[-1].filename, TESTS)}:{where[-1].lineno}" if where else ""
    if isinstance(exc, AssertionError):
        msg = str(exc) or "assertion failed"
        if loc:
            msg += f"\n(at {loc}: {where[-1].line})"
        return msg
    return "".join(traceback.format_exception(exc)).rstrip()


def run_integration(tally, filt, verbose):
    signal.signal(signal.SIGALRM, _on_alarm)
    files = [f for d in SUITES for f in sorted(glob.glob(os.path.join(TESTS, d, "test_*.py")))]
    for path in files:
        modname = os.path.splitext(os.path.basename(path))[0]
        try:
            mod = load_module(path)
        except Exception as e:
            tally.fail(f"{modname} (import)", describe_failure(e))
            continue
        tests = [(n, f) for n, f in vars(mod).items()
                 if n.startswith("test_") and inspect.isfunction(f) and f.__module__ == mod.__name__]
        tests = [(f"{modname}.{n}", f) for n, f in tests]
        tests = [t for t in tests if not filt or filt in t[0]]
        if not tests:
            continue
        config = dict(getattr(mod, "CLUSTER", {}) or {})
        limit = int(getattr(mod, "TIMEOUT", 120))
        cluster, cluster_error = None, None
        try:
            for name, fn in tests:
                wants_cluster = len(inspect.signature(fn).parameters) > 0
                if wants_cluster and cluster is None and cluster_error is None:
                    try:
                        signal.alarm(120)
                        cluster = harness.Cluster(threads=config.get("threads", 2),
                                                  env=config.get("env"),
                                                  gateway=config.get("gateway", True)).start()
                    except harness.Skip as e:
                        # A developer may run the tests before the gateway builds; CI must not go
                        # green that way.
                        cluster_error = ("fail" if os.environ.get("CI") == "true" else "skip", str(e))
                    except Exception as e:
                        cluster_error = ("fail", "could not start the module's cluster:\n" +
                                         describe_failure(e))
                    finally:
                        signal.alarm(0)
                if wants_cluster and cluster_error is not None:
                    if cluster_error[0] == "skip":
                        tally.skip(name, cluster_error[1])
                    else:
                        tally.fail(name, cluster_error[1])
                    continue
                mark = len(harness.started_gateways())
                log_from = len(cluster.gateway.log_text()) if wants_cluster and cluster.gateway else 0
                t0 = time.monotonic()
                try:
                    signal.alarm(limit)
                    try:
                        if wants_cluster:
                            cluster.ensure_running()
                            fn(cluster)
                        else:
                            fn()
                    finally:
                        signal.alarm(0)
                except harness.Skip as e:
                    tally.skip(name, str(e))
                except (Exception, TestTimeout) as e:
                    # What the gateways logged during this test only: the shared one from where
                    # the test began, the ones the test started in full.
                    texts = [g.log_text() for g in harness.started_gateways()[mark:]]
                    if wants_cluster and cluster.gateway is not None:
                        texts.insert(0, cluster.gateway.log_text()[log_from:])
                    texts = [t.rstrip() for t in texts if t.strip()]
                    log = ("gateway log during the test", "\n".join(texts[-2:])) if texts else None
                    tally.fail(name, describe_failure(e), log)
                    if wants_cluster:
                        try:
                            cluster.ensure_running()
                        except Exception as e2:
                            print(f"    (could not bring the cluster back: {e2}; starting a new one)")
                            cluster.close()
                            cluster = None
                else:
                    tally.ok(name, time.monotonic() - t0)
        finally:
            if cluster is not None:
                cluster.close()


def main():
    ap = argparse.ArgumentParser(description="Runs cityhall's unit and integration tests.")
    ap.add_argument("-k", dest="filter", default="", help="only tests whose name contains this")
    ap.add_argument("-v", dest="verbose", action="store_true", help="print each test's duration")
    args = ap.parse_args()

    # A TERM (CI timeout, kill) becomes SystemExit so that finally blocks and atexit stop servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tally = Tally(args.verbose)
    t0 = time.monotonic()
    try:
        run_unit(tally, args.filter)
        run_integration(tally, args.filter, args.verbose)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        tally.failed += 1
    if args.verbose:
        print(f"# {time.monotonic() - t0:.1f}s")
    print(f"{tally.passed} passed, {tally.failed} failed, {tally.skipped} skipped", flush=True)
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
