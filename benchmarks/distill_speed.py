"""Forward throughput of teachers vs students on this CPU, measured interleaved so that a busy machine
slows both equally (the training benchmarks time each model at a different moment).

    python benchmarks/distill_speed.py        # writes benchmarks/results/distill_speed.json (~1 min)

Speed depends on the architecture, not on the trained values, so the students here are untrained
copies of the benchmarked architectures: the tiny LM student config of distill_tiny_lm.py, and
all-MiniLM-L6-v2 cut to the two layers of distill_minilm.py. Each round times one batch of every model;
the best of ROUNDS rounds is reported.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from distill_minilm import encode, make_student, sentences, tokenize  # noqa: E402
from distill_tiny_lm import STUDENT  # noqa: E402

from llmspace import models as M  # noqa: E402

ROUNDS = 7


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    lm_teacher, lm_student = M.load_tiny_lm(), M.TinyLM(STUDENT).eval()
    x = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(0))
    st = M.load_minilm()
    bert = st[0].auto_model.eval()
    bert_student = make_student(bert).eval()
    tokens = tokenize(st, sentences()[1][:64])
    models = {"tiny LM teacher": lambda: lm_teacher(x), "tiny LM student": lambda: lm_student(x),
              "MiniLM 6 layers": lambda: encode(bert, tokens), "MiniLM 2 layers": lambda: encode(bert_student, tokens)}
    for fn in models.values():
        fn()  # warm-up
    best = {name: float("inf") for name in models}
    for _ in range(ROUNDS):
        for name, fn in models.items():
            best[name] = min(best[name], timed(fn))
    work = {"tiny LM teacher": x.numel(), "tiny LM student": x.numel(), "MiniLM 6 layers": 64, "MiniLM 2 layers": 64}
    rows = {name: {"seconds": best[name], "per_s": work[name] / best[name],
                   "unit": "tokens" if name.startswith("tiny") else "sentences"} for name in models}
    rows["tiny LM student"]["speedup"] = best["tiny LM teacher"] / best["tiny LM student"]
    rows["MiniLM 2 layers"]["speedup"] = best["MiniLM 6 layers"] / best["MiniLM 2 layers"]
    for name, r in rows.items():
        print(f"{name:18} {r['per_s']:10,.0f} {r['unit']}/s" + (f"  ({r['speedup']:.2f}x)" if "speedup" in r else ""))
    write_result("distill_speed", {"settings": {"rounds": ROUNDS, "tiny_lm_batch": list(x.shape),
                                                "minilm_sentences": 64, "threads": torch.get_num_threads()},
                                   "results": rows})


if __name__ == "__main__":
    main()
