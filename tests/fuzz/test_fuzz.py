"""The fuzz targets' short form: build them once (clang-14, ASan + UBSan, libFuzzer) in $CITYHALL_BUILD-fuzz, replay
every regression input, then fuzz each target for ~10 s from its seed corpus. Any crash, leak, sanitizer report
or oracle failure ("FUZZ FINDING") fails the target's test. tests/fuzz/run-long runs the same targets longer.
"""

import os
import shutil
import subprocess
import tempfile

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = harness.BUILD.rstrip("/") + "-fuzz"
SECONDS = 10
TIMEOUT = 300  # the first test builds the targets
FLAGS = ["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=0"]
ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
           UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
REPORTS = ("FUZZ FINDING", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
           "ERROR: libFuzzer")

_built = None  # None: not tried yet; else "" (built) or why it could not be


def build():
    """Configures (once) and builds the fuzz targets; returns "" or the reason they cannot be built here."""
    global _built
    if _built is not None:
        return _built
    if shutil.which("clang-14") is None:
        _built = "clang-14 is not installed (ops/dev installs clang-14 and libclang-rt-14-dev)"
        return _built
    if not os.path.exists(os.path.join(BUILD, "build.ninja")):
        r = subprocess.run(["meson", "setup", BUILD, harness.ROOT, "-Dfuzz=true",
                            "-Db_sanitize=address,undefined"],
                           env=dict(os.environ, CC="clang-14"), capture_output=True, text=True)
        assert r.returncode == 0, f"meson setup {BUILD} failed:\n{r.stdout[-3000:]}{r.stderr[-2000:]}"
    r = subprocess.run(["ninja", "-C", BUILD, "fuzz"], capture_output=True, text=True)
    assert r.returncode == 0, f"ninja -C {BUILD} fuzz failed:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"
    _built = ""
    return _built


def findings(output):
    return [line for line in output.splitlines() if any(k in line for k in REPORTS)]


def run_target(name):
    why = build()
    if why:
        if os.environ.get("CI") == "true":
            raise AssertionError(why)
        raise harness.Skip(why)
    binary = os.path.join(BUILD, "tests", "fuzz", "fuzz_" + name)
    corpus = os.path.join(HERE, "corpus", name)
    regressions = os.path.join(HERE, "regressions", name)
    assert os.listdir(corpus), f"no seed inputs in {corpus}"
    # every input that once failed, replayed one by one so that a failure names its file
    cases = sorted(os.path.join(regressions, f) for f in os.listdir(regressions)) if os.path.isdir(regressions) else []
    if cases:
        r = subprocess.run([binary] + FLAGS + cases, capture_output=True, text=True, env=ENV, timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and not findings(out), \
            f"fuzz_{name}: a regression input fails again:\n" + "\n".join(findings(out) or out.splitlines()[-30:])
    # new inputs go to a scratch folder: the checked-in corpus stays as it is
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as scratch:
        extra = [f"-dict={os.path.join(HERE, name + '.dict')}"] if os.path.exists(os.path.join(HERE, name + ".dict")) else []
        r = subprocess.run([binary, f"-max_total_time={SECONDS}", f"-artifact_prefix={scratch}/"] + FLAGS + extra +
                           [scratch, corpus] + ([regressions] if cases else []),
                           capture_output=True, text=True, env=ENV, timeout=SECONDS + 120)
        out = r.stdout + r.stderr
        crashes = [f for f in os.listdir(scratch) if f.startswith(("crash-", "leak-", "timeout-", "oom-"))]
        assert r.returncode == 0 and not findings(out) and not crashes, \
            f"fuzz_{name} found a problem (exit {r.returncode}; keep the input as a regression case):\n" + \
            "\n".join((findings(out) or out.splitlines())[-30:])
        assert "Done" in out or "DONE" in out, f"fuzz_{name} did not run to its time limit:\n{out[-2000:]}"


def test_fuzz_transcode():
    run_target("transcode")


def test_fuzz_decode():
    run_target("decode")


def test_fuzz_router():
    run_target("router")


def test_fuzz_idnumber():
    run_target("idnumber")


def test_fuzz_token():
    run_target("token")


def test_fuzz_healthcode():
    run_target("healthcode")


def test_fuzz_callback():
    run_target("callback")
