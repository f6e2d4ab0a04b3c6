"""Long differential fuzz of ``llmspace.storage.parse_safetensors_header`` against ``safetensors`` 0.8.

    python benchmarks/storage_fuzz.py --engine hypothesis --examples 200000   # grammar-based, ~minutes
    python benchmarks/storage_fuzz.py --engine atheris --seconds 600          # coverage-guided bytes
    # writes benchmarks/results/storage_fuzz.json (engine, cases, accepted, rejected, disagreements)

The oracle is the one of ``tests/test_storage_faults.py::test_fuzz_headers_agree_with_safetensors``: our
parser and ``safetensors.deserialize`` (the Rust parser) must both accept, with the same tensors, names,
dtypes and shapes, or both reject — except that we refuse duplicate keys, which the reference tolerates.
Ours may only ever raise ValueError. The CI test runs the same grammar for 300 cases; this runs it long.

* ``hypothesis``: the test's grammar (tensors with every dtype, sizes near 2**64, offsets that overlap
  or leave gaps, odd extra fields and JSON literals), with a large budget.
* ``atheris`` (libFuzzer, coverage-guided on our Python code): mutates raw bytes, starting from the
  committed corpus (tests/data/safetensors_corpus.py) and files written by safetensors itself.

A disagreement is printed with its input (hex) and, with ``--save-failures``, appended to
``benchmarks/results/storage_fuzz_failures.txt`` so it can join the corpus.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

COUNTS = {"cases": 0, "accepted": 0, "rejected": 0, "duplicate_key_refusals": 0, "disagreements": 0}
FAILURES: list[str] = []
_ATHERIS: list = []          # (args, start) while atheris runs
_LAST = [0.0]


def check(blob: bytes) -> None:
    """Run one input through both parsers; record a disagreement instead of raising."""
    from tests.test_storage_faults import ours_accepts, reference_accepts
    COUNTS["cases"] += 1
    try:
        ok, got = ours_accepts(blob)
    except Exception as exc:  # noqa: BLE001 - anything but ValueError is a finding
        ok, got = None, f"{type(exc).__name__}: {exc}"
    ref_ok, ref = reference_accepts(blob)
    if ok is False and ref_ok and "duplicate key" in got:
        COUNTS["duplicate_key_refusals"] += 1
    elif ok is None or ok != ref_ok or (ok and got != ref):
        COUNTS["disagreements"] += 1
        FAILURES.append(f"{blob.hex()}\tours={got!r}\treference={ref!r}")
        print("DISAGREEMENT", FAILURES[-1][:500], flush=True)
    else:
        COUNTS["accepted" if ok else "rejected"] += 1
    if _ATHERIS and time.perf_counter() - _LAST[0] > 5:    # libFuzzer ends the process with _exit:
        _LAST[0] = time.perf_counter()                      # keep the result file current instead
        finish(_ATHERIS[0], _ATHERIS[1], final=False)


def run_hypothesis(examples: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hs

    from tests.test_storage_faults import fuzz_blob

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(hs.data())
    def fuzz(data):
        check(fuzz_blob(data.draw))

    fuzz()


def seeds() -> list[bytes]:
    import safetensors.torch as st
    import torch

    from tests.data.safetensors_corpus import CORPUS, STRICTER, file_bytes
    out = [file_bytes(h, d) for _, h, d in CORPUS + STRICTER]
    out.append(st.save({"a": torch.arange(6.0), "b": torch.ones(3, dtype=torch.int8)}, metadata={"k": "v"}))
    out.append(st.save({"c": torch.zeros(2, 2, dtype=torch.float8_e4m3fn), "d": torch.zeros(1, dtype=torch.complex64)}))
    return out


def run_atheris(seconds: int) -> None:
    import tempfile

    import atheris
    corpus = Path(tempfile.mkdtemp(prefix="st-fuzz-"))
    for i, blob in enumerate(seeds()):
        (corpus / f"seed{i:03d}").write_bytes(blob)
    with atheris.instrument_imports():
        import llmspace.storage  # noqa: F401 - instrumented for coverage feedback
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-max_len=4096", "-rss_limit_mb=4096",
                   str(corpus)], lambda data: check(bytes(data)))
    try:
        atheris.Fuzz()
    except SystemExit:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    parser.add_argument("--examples", type=int, default=200_000, help="hypothesis: number of cases")
    parser.add_argument("--seconds", type=int, default=600, help="atheris: wall-time budget")
    parser.add_argument("--save-failures", action="store_true")
    parser.add_argument("--no-result", action="store_true", help="print only; write no results JSON")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.engine == "atheris":
        _ATHERIS.extend([args, start])
        run_atheris(args.seconds)
    else:
        run_hypothesis(args.examples)
    finish(args, start)


def finish(args, start: float, final: bool = True) -> None:
    import safetensors
    payload = {"engine": args.engine, "budget": args.examples if args.engine == "hypothesis" else args.seconds,
               "seconds": round(time.perf_counter() - start, 1), "safetensors": safetensors.__version__,
               **COUNTS}
    print(payload, flush=True)
    if args.save_failures and FAILURES and final:
        with open(ROOT / "benchmarks" / "results" / "storage_fuzz_failures.txt", "a") as f:
            f.write("\n".join(FAILURES) + "\n")
    if not args.no_result:
        write_result(f"storage_fuzz_{args.engine}", payload)


if __name__ == "__main__":
    main()
