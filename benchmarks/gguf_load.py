"""Opening the shipped SmolLM2 GGUF: llmspace.gguf (mmap, lazy tensors) vs gguf-py's GGUFReader.

    python benchmarks/gguf_load.py        # writes benchmarks/results/gguf_load.json

Page cache warm (the file is read once first). Three timings each, in this process, median reported:

* ``open``: parse header, metadata and tensor infos (llmspace.gguf maps the file and builds no tensor
  views; gguf-py also builds a numpy view per field part and per tensor).
* ``dequantize_all``: every tensor decoded to fp32 (llmspace ``GGUFFile.dequantize`` vs
  ``gguf.quants.dequantize``).
Plus the file's composition: bytes, parameters, bits per weight, tensors per ggml type.
"""
from __future__ import annotations

import statistics
from importlib.metadata import version
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import gguf  # noqa: E402

from llmspace.gguf import GGUFFile  # noqa: E402
from llmspace.models import smollm2_gguf_path  # noqa: E402

REPEAT = 3


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    path = smollm2_gguf_path()
    path.read_bytes()                                   # warm the page cache
    with GGUFFile(path) as g:
        infos = list(g.tensors.values())
        names = list(g.tensors)
    n_params = sum(t.numel for t in infos)
    size = path.stat().st_size

    def ours_open():
        GGUFFile(path).close()

    def ref_open():
        gguf.GGUFReader(path)

    def ours_all():
        with GGUFFile(path) as g:
            for n in names:
                g.dequantize(n)

    reader = gguf.GGUFReader(path)

    def ref_all():
        for t in reader.tensors:
            gguf.quants.dequantize(t.data, t.tensor_type)

    timings = {}
    for label, fn in [("llmspace_open_s", ours_open), ("gguf_reader_open_s", ref_open),
                      ("llmspace_dequantize_all_s", ours_all), ("gguf_dequantize_all_s", ref_all)]:
        runs = [timed(fn) for _ in range(REPEAT)]
        timings[label] = {"median": statistics.median(runs), "runs": runs}
        print(label, timings[label])
    payload = {
        "file": path.name, "file_bytes": size, "parameters": n_params,
        "bits_per_weight": 8 * size / n_params,
        "tensor_bytes": sum(t.nbytes for t in infos),
        "tensors_per_type": dict(Counter(t.ggml_type.name for t in infos)),
        "parameters_per_type": {k: sum(t.numel for t in infos if t.ggml_type.name == k)
                                for k in sorted({t.ggml_type.name for t in infos})},
        "repeat": REPEAT, "page_cache": "warm", "gguf_py_version": version("gguf"),
        **timings,
    }
    print(write_result("gguf_load", payload))


if __name__ == "__main__":
    main()
