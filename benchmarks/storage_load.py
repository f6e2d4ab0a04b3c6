"""Checkpoint loading: time and peak resident memory of six loaders on a ~512 MiB model, in one run.

    python benchmarks/storage_load.py        # writes benchmarks/results/storage_load.json

Every measurement runs in a fresh Python process (so peak RSS is that loader's alone): the process
imports torch, builds the model with its parameters allocated and touched (the model's own memory),
records its RSS, then loads the checkpoint *into the model* (the job a loader exists for) and records
the wall time and the peak RSS (``VmHWM`` of ``/proc/self/status``, which counts file pages mapped and
touched as well as anonymous memory).

Page cache: ``warm`` reads the file(s) once right before each process starts; ``cold`` evicts the
file's pages with ``posix_fadvise(POSIX_FADV_DONTNEED)`` — unprivileged and limited to these files (no
``drop_caches``); whether the storage underneath (a VM's virtual disk) has its own cache is outside
our control, so cold numbers are an upper bound on this machine's read speed, not an NVMe figure.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

N_LAYERS, WIDTH = 8, 4096          # 8 x 4096 x 4096 fp32 = 512 MiB
SHARD_BYTES = 128 * 2**20
REPEAT = 3

CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from llmspace import storage as S
    loader, path, n_layers, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    base = S.peak_rss_bytes()
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False, device="meta")
                                  for _ in range(n_layers)]).to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(0)            # fault the model's pages in: they are the model's own memory
    before = S.peak_rss_bytes()
    start = time.perf_counter()
    if loader == "torch.load":
        model.load_state_dict(torch.load(path, weights_only=True))
    elif loader == "torch.load(mmap=True)":
        model.load_state_dict(torch.load(path, weights_only=True, mmap=True))
    elif loader == "safetensors.load_file":
        import safetensors.torch
        model.load_state_dict(safetensors.torch.load_file(path))
    elif loader == "llmspace.load_file":
        model.load_state_dict(S.load_file(path))
    elif loader == "llmspace.load_file(copy=True)":
        model.load_state_dict(S.load_file(path, copy=True))
    elif loader == "llmspace.load_file (load only)":
        sd = S.load_file(path)
    elif loader == "safetensors.load_file (load only)":
        import safetensors.torch
        sd = safetensors.torch.load_file(path)
    elif loader in ("llmspace.load_into_model", "llmspace.load_into_model (sharded)"):
        S.load_into_model(model, path)
    else:
        raise SystemExit(f"unknown loader {loader}")
    if "load only" in loader:
        for t in sd.values():
            t.sum()                # touch every byte: mmap-backed tensors are read lazily
    seconds = time.perf_counter() - start
    check = float(model[0].weight[0, :4].sum() + model[-1].weight[-1, -4:].sum())
    print(json.dumps({"seconds": seconds, "interpreter_rss": base, "rss_before": before,
                      "peak_rss": S.peak_rss_bytes(), "check": check}))
""")

LOADERS = [  # (name, which checkpoint file)
    ("torch.load", "pickle"),
    ("torch.load(mmap=True)", "pickle"),
    ("safetensors.load_file", "single"),
    ("llmspace.load_file", "single"),
    ("llmspace.load_file(copy=True)", "single"),
    ("llmspace.load_into_model", "single"),
    ("llmspace.load_into_model (sharded)", "index"),
    ("safetensors.load_file (load only)", "single"),
    ("llmspace.load_file (load only)", "single"),
]


def files_of(path: Path) -> list[Path]:
    if path.name.endswith(".json"):
        return [path.parent / f for f in dict.fromkeys(json.loads(path.read_text())["weight_map"].values())]
    return [path]


def set_cache(path: Path, state: str) -> None:
    for f in files_of(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            if state == "cold":
                os.fsync(fd)   # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 16 << 20):
                    pass
        finally:
            os.close(fd)


def run_child(loader: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, loader, str(path), str(N_LAYERS), str(WIDTH)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from llmspace import storage as S
    torch.manual_seed(0)
    state_dict = {f"{i}.weight": torch.randn(WIDTH, WIDTH) for i in range(N_LAYERS)}
    model_bytes = sum(S.tensor_bytes(t) for t in state_dict.values())
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/tmp")) as tmp:
        tmp = Path(tmp)
        paths = {"pickle": tmp / "model.pt", "single": tmp / "model.safetensors"}
        torch.save(state_dict, paths["pickle"])
        S.save_file(state_dict, paths["single"])
        paths["index"] = S.save_sharded(state_dict, tmp / "sharded", SHARD_BYTES)
        largest_shard = max(f.stat().st_size for f in files_of(paths["index"]))
        expected = float(state_dict["0.weight"][0, :4].sum() + state_dict[f"{N_LAYERS - 1}.weight"][-1, -4:].sum())
        del state_dict
        rows = []
        for cache in ("warm", "cold"):
            for loader, which in LOADERS:
                samples = []
                for _ in range(REPEAT):
                    set_cache(paths[which], cache)
                    r = run_child(loader, paths[which])
                    if "load only" not in loader:
                        assert abs(r["check"] - expected) < 1e-3, (loader, r["check"], expected)
                    samples.append(r)
                med = lambda k: statistics.median(s[k] for s in samples)
                row = {"loader": loader, "cache": cache, "file": which, "seconds": med("seconds"),
                       "seconds_all": [s["seconds"] for s in samples],
                       "interpreter_rss": med("interpreter_rss"), "rss_before": med("rss_before"),
                       "peak_rss": med("peak_rss")}
                row["peak_over_before"] = row["peak_rss"] - row["rss_before"]
                row["peak_over_interpreter"] = row["peak_rss"] - row["interpreter_rss"]
                rows.append(row)
                print(f"{cache:4} {loader:38} {row['seconds']:6.3f} s  peak {row['peak_rss'] / 2**20:7.0f} MiB"
                      f"  (+{row['peak_over_before'] / 2**20:5.0f} MiB over the model)", flush=True)
    for cache in ("warm", "cold"):
        ref = next(r for r in rows if r["cache"] == cache and r["loader"] == "safetensors.load_file")
        for r in rows:
            if r["cache"] == cache:
                r["time_vs_safetensors"] = r["seconds"] / ref["seconds"]
                r["peak_vs_safetensors"] = r["peak_rss"] / ref["peak_rss"]
    stream = next(r for r in rows if r["cache"] == "warm" and r["loader"] == "llmspace.load_into_model (sharded)")
    summary = {
        "model_bytes": model_bytes, "largest_shard_bytes": largest_shard,
        "streaming_peak_over_interpreter_vs_shard_plus_model":
            stream["peak_over_interpreter"] / (largest_shard + model_bytes),
    }
    for cache in ("warm", "cold"):
        get = lambda name: next(r for r in rows if r["cache"] == cache and r["loader"] == name)["seconds"]
        summary[f"{cache}_eager_vs_safetensors_into_model"] = get("llmspace.load_file") / get("safetensors.load_file")
        summary[f"{cache}_eager_vs_safetensors_load_only"] = (get("llmspace.load_file (load only)")
                                                              / get("safetensors.load_file (load only)"))
    path = write_result("storage_load", {
        "settings": {"model": f"{N_LAYERS} x Linear({WIDTH}, {WIDTH}, bias=False), fp32",
                     "shard_bytes": SHARD_BYTES, "repeat": REPEAT, "statistic": "median of fresh processes",
                     "page_cache": "warm: files read just before; cold: posix_fadvise(DONTNEED) on the files",
                     "torch.load": "weights_only=True", "safetensors": __import__("safetensors").__version__},
        "summary": summary, "results": rows})
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
