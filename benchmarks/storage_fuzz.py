"""Long differential fuzz of ``llmspace.storage.parse_safetensors_header`` against ``safetensors`` 0.8,
with two engines in one run, recorded in one file:

    python benchmarks/storage_fuzz.py          # hypothesis 30,000 cases, then atheris 240 s (~7.5 min on 2 cores)
    # writes benchmarks/results/storage_fuzz.json: per engine, cases, accepted, rejected, disagreements
    python benchmarks/storage_fuzz.py --examples 300 --seconds 10 --no-result   # a smoke run, no file
    python benchmarks/storage_fuzz.py --engine atheris --seconds 600            # one engine: prints, no file

Default budgets: 30,000 hypothesis cases and 240 s of atheris. The recorded run (f7eca01, 2 cores):
hypothesis 194.7 s (154 cases/s), atheris 5,597,263 inputs in 240 s (23,000/s), 440.5 s in all. Only a
run of both engines writes the results file (its ``"engines"`` field names them); ``--engine`` alone is
for longer exploratory runs and only prints, so the file never mixes runs of different commands.

The oracle is the header part of ``tests/test_storage_faults.py::test_fuzz_headers_agree_with_safetensors``:
our parser and ``safetensors.deserialize`` (the Rust parser) must both accept, with the same tensor names,
dtypes and shapes, or both reject — except that we refuse duplicate keys, which the reference tolerates
(the test also compares the bytes ``read_tensor`` returns; this does not). Ours may only ever raise
ValueError. The CI test runs the same grammar for 300 cases; this runs it long.

* ``hypothesis``: the test's grammar (tensors with every dtype, sizes near 2**64, offsets that overlap
  or leave gaps, odd extra fields and JSON literals), with a large budget.
* ``atheris`` (libFuzzer, coverage-guided on our Python code): mutates raw bytes, starting from the
  committed corpus (tests/data/safetensors_corpus.py) and files written by safetensors itself. It runs
  in a child process: libFuzzer ends its process with ``_exit``, and its coverage instrumentation must
  see ``llmspace.storage`` imported for the first time. The child reports its counts through a file and
  stops itself when its budget is spent.

A disagreement is printed with its input (hex) and, with ``--save-failures``, appended to
``benchmarks/results/storage_fuzz_failures.txt`` so it can join the corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

ENGINES = ("hypothesis", "atheris")
KEPT_FAILURES = 1000           # inputs kept per engine for --save-failures; the count is always exact


class Tally:
    """Counts of one engine's run; ``check`` feeds it one input at a time."""

    def __init__(self) -> None:
        self.counts = {"cases": 0, "accepted": 0, "rejected": 0, "duplicate_key_refusals": 0, "disagreements": 0}
        self.failures: list[str] = []

    def check(self, blob: bytes) -> None:
        """Run one input through both parsers; record a disagreement instead of raising."""
        from tests.test_storage_faults import ours_accepts, reference_accepts
        self.counts["cases"] += 1
        try:
            ok, got = ours_accepts(blob)
        except Exception as exc:  # noqa: BLE001 - anything but ValueError is a finding
            ok, got = None, f"{type(exc).__name__}: {exc}"
        ref_ok, ref = reference_accepts(blob)
        if ok is False and ref_ok and "duplicate key" in got:
            self.counts["duplicate_key_refusals"] += 1
        elif ok is None or ok != ref_ok or (ok and got != ref):
            self.counts["disagreements"] += 1
            line = f"{blob.hex()}\tours={got!r}\treference={ref!r}"
            if len(self.failures) < KEPT_FAILURES:
                self.failures.append(line)
            print("DISAGREEMENT", line[:500], flush=True)
        else:
            self.counts["accepted" if ok else "rejected"] += 1


def run_hypothesis(examples: int) -> dict:
    """The test's grammar for ``examples`` cases, in this process."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hs

    from tests.test_storage_faults import fuzz_blob
    tally, start = Tally(), time.perf_counter()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(hs.data())
    def fuzz(data):
        tally.check(fuzz_blob(data.draw))

    fuzz()
    return {"budget": {"examples": examples}, "seconds": round(time.perf_counter() - start, 1),
            "stopped": "budget", **tally.counts, "failures": tally.failures}


def seeds() -> list[bytes]:
    import safetensors.torch as st
    import torch

    from tests.data.safetensors_corpus import CORPUS, STRICTER, file_bytes
    out = [file_bytes(h, d) for _, h, d in CORPUS + STRICTER]
    out.append(st.save({"a": torch.arange(6.0), "b": torch.ones(3, dtype=torch.int8)}, metadata={"k": "v"}))
    out.append(st.save({"c": torch.zeros(2, 2, dtype=torch.float8_e4m3fn), "d": torch.zeros(1, dtype=torch.complex64)}))
    return out


def atheris_child(seconds: int, report: Path) -> None:
    """Fuzz for ``seconds`` with atheris in this (child) process, rewriting ``report`` (JSON: the counts,
    ``"stopped"``) every 5 s and when the budget is spent, then end the process."""
    import atheris
    corpus = Path(tempfile.mkdtemp(prefix="st-fuzz-"))
    for i, blob in enumerate(seeds()):
        (corpus / f"seed{i:03d}").write_bytes(blob)
    tally, start, last = Tally(), time.perf_counter(), [0.0]

    def save(stopped: str | None) -> None:
        out = {"budget": {"seconds": seconds}, "seconds": round(time.perf_counter() - start, 1),
               "stopped": stopped, **tally.counts, "failures": tally.failures}
        report.with_suffix(".tmp").write_text(json.dumps(out))
        os.replace(report.with_suffix(".tmp"), report)          # the parent never reads half a file

    def one(data: bytes) -> None:
        tally.check(bytes(data))
        now = time.perf_counter()
        if now - start >= seconds:
            save("budget")
            sys.stdout.flush()
            os._exit(0)                  # libFuzzer would end the process anyway, without a word
        if now - last[0] > 5:
            last[0] = now
            save(None)

    with atheris.instrument_imports():
        import llmspace.storage  # noqa: F401 - instrumented for coverage feedback
    # -max_total_time only as a backstop: the callback above stops at the budget
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds + 120}", "-max_len=4096", "-rss_limit_mb=4096",
                   str(corpus)], one)
    atheris.Fuzz()


def run_atheris(seconds: int) -> dict:
    """Run ``atheris_child`` in a child process and return its report (``"stopped"`` says whether it spent
    its budget or how it ended otherwise)."""
    with tempfile.TemporaryDirectory(prefix="st-fuzz-report-") as tmp:
        report = Path(tmp) / "atheris.json"
        done = subprocess.run([sys.executable, __file__, "--atheris-child", str(report), "--seconds", str(seconds)],
                              cwd=ROOT)
        if not report.exists():
            raise SystemExit(f"the atheris child ended (exit code {done.returncode}) before its first report")
        out = json.loads(report.read_text())
    if out["stopped"] is None or done.returncode:
        out["stopped"] = f"exit code {done.returncode} after {out['seconds']} s"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="run one engine only (prints, writes no results file); default: both, in order")
    parser.add_argument("--examples", type=int, default=30_000, help="hypothesis: number of cases")
    parser.add_argument("--seconds", type=int, default=240, help="atheris: wall-time budget (s)")
    parser.add_argument("--save-failures", action="store_true")
    parser.add_argument("--no-result", action="store_true", help="print only; write no results JSON")
    parser.add_argument("--atheris-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.atheris_child:
        atheris_child(args.seconds, args.atheris_child)
        return
    import safetensors
    start = time.perf_counter()
    engines = [args.engine] if args.engine else list(ENGINES)
    runs = {}
    for engine in engines:
        runs[engine] = run_hypothesis(args.examples) if engine == "hypothesis" else run_atheris(args.seconds)
        print(engine, {k: v for k, v in runs[engine].items() if k != "failures"}, flush=True)
    failures = [line for r in runs.values() for line in r.pop("failures")]
    if args.save_failures and failures:
        with open(ROOT / "benchmarks" / "results" / "storage_fuzz_failures.txt", "a") as f:
            f.write("\n".join(failures) + "\n")
    payload = {"engines": engines, "safetensors": safetensors.__version__,
               "seconds": round(time.perf_counter() - start, 1), "results": runs,
               "disagreements": sum(r["disagreements"] for r in runs.values())}
    if args.no_result or args.engine:
        print("no results file written" + (" (one engine only: the file records runs of both)" if args.engine else ""))
    else:
        print(f"wrote {write_result('storage_fuzz', payload)}")


if __name__ == "__main__":
    main()
