"""Shared helpers for benchmarks: provenance (machine, versions, settings) and robust timing."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def git_describe() -> str:
    """``git describe --always --dirty`` of this checkout: the provenance every result records.

    A copy without ``.git`` (the GPU machine gets a bare copy of the tree) passes the description in
    ``LLMSPACE_GIT_DESCRIBE``; with neither, "unknown" (never an empty string that looks clean).
    """
    override = os.environ.get("LLMSPACE_GIT_DESCRIBE")
    if override:
        return override
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


# Taken when the benchmark starts: the code that produced a number is the code checked out at the start,
# whatever is committed while it runs.
DESCRIBE_AT_START = git_describe()


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = DESCRIBE_AT_START
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("scipy", "torch"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = module.__version__
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "versions": versions,
            "commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def best_time(fn, repeat: int = 7, min_seconds: float = 0.2) -> float:
    """Best wall time of one call (seconds): calls are batched so each sample lasts >= min_seconds/repeat."""
    fn()  # warm-up: page faults, caches, lazy imports
    start = time.perf_counter()
    fn()
    one = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(min_seconds / repeat / one))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return min(samples)


def copy_bandwidth(nbytes: int = 256 * 2**20) -> float:
    """Single-threaded streaming bandwidth in GB/s: a numpy copy reads and writes nbytes each."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    seconds = best_time(lambda: np.copyto(dst, src), repeat=5)
    return 2 * nbytes / seconds / 1e9


def run_command() -> dict:
    """The command that is running: ``{"script": path of ``sys.argv[0]`` relative to the repository root
    (absolute if it lies outside), "argv": the arguments after it}`` — so a results file names the exact
    command that made it."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None:
        shown = ""
    else:
        try:
            shown = script.relative_to(ROOT).as_posix()
        except ValueError:
            shown = str(script)
    return {"script": shown, "argv": list(sys.argv[1:])}


def write_result(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` with provenance: ``"machine"`` (hardware, versions, the
    commit) and ``"run"`` (the script and its arguments, see ``run_command``) ahead of ``payload``.

    A dirty tree is refused unless ``LLMSPACE_ALLOW_DIRTY=1``, and then the commit field says "-dirty":
    a number must name the code that produced it.
    """
    commit = DESCRIBE_AT_START
    if commit.endswith("-dirty") and os.environ.get("LLMSPACE_ALLOW_DIRTY") != "1":
        raise SystemExit(f"refusing to write results/{name}.json from a dirty tree ({commit}): commit first, "
                         "or set LLMSPACE_ALLOW_DIRTY=1 to record it as dirty")
    if "machine" in payload or "run" in payload:
        raise ValueError(f"payload keys 'machine' and 'run' are reserved for provenance, got {sorted(payload)}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "run": run_command(), **payload}, indent=2) + "\n")
    return path


def cuda_seconds(fn, repeat: int = 50, warmup: int = 5, stat: str = "median") -> float:
    """Seconds per call timed with CUDA events after warm-up; ``stat`` is "median" or "min"."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times) if stat == "min" else sorted(times)[len(times) // 2]
