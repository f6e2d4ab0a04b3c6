"""Forward throughput of teachers vs students on this CPU, measured interleaved so that a busy machine
slows both equally (the training benchmarks time each model at a different moment), and repeated so
that the spread of the speed-up is part of the result.

    python benchmarks/distill_speed.py     # writes benchmarks/results/distill_speed.json
    python benchmarks/distill_speed.py --smoke   # 2 repeats of 1 round, prints, writes nothing

Speed depends on the architecture, not on the trained values, so the students here are untrained
copies of the benchmarked architectures: the tiny LM student config of distill_tiny_lm.py, and
all-MiniLM-L6-v2 cut to the two layers of distill_minilm.py. Inputs: the tiny LMs read 8 x 128 random
bytes; the MiniLMs encode 64 held-out sentences.

One *repeat* is ``--rounds`` rounds (default 7); each round times one batch of every model, one after
the other, and the repeat reports each model's best round and the speed-ups (teacher seconds / student
seconds). ``--repeats`` (default 3) independent repeats run back to back in this process, each with the
load average before and after it, so one file shows how far the speed-up moves on this machine; a
reader should trust a speed-up only as far as the repeats agree. Cost: about 1.3-1.4 s per round with one
thread (mostly the 6-layer MiniLM; the committed run's 7-round repeats took 9.1-10.1 s at load average
1.5-1.8 on 2 cores), so the default 3 x 7 rounds take about half a minute plus the loading; on a crowded
machine, many times that. ``--threads`` (default 1) fixes torch's intra-op threads: with
a varying thread count the repeats would not measure the same thing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from distill_minilm import encode, make_student, sentences, tokenize  # noqa: E402
from distill_tiny_lm import STUDENT  # noqa: E402

from llmspace import models as M  # noqa: E402

# (teacher, student) pairs whose speed-up is reported, keyed by the name the book uses
PAIRS = {"tiny LM": ("tiny LM teacher", "tiny LM student"), "MiniLM": ("MiniLM 6 layers", "MiniLM 2 layers")}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_repeat(models: dict, rounds: int) -> dict:
    """Best seconds of each model over ``rounds`` interleaved rounds, the speed-ups, and the 1-minute load
    average before and after."""
    load_before, start = os.getloadavg()[0], time.perf_counter()
    best = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, fn in models.items():
            best[name] = min(best[name], timed(fn))
    return {"seconds": best, "speedup": {pair: best[t] / best[s] for pair, (t, s) in PAIRS.items()},
            "load_average": [load_before, os.getloadavg()[0]], "wall_seconds": time.perf_counter() - start}


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "max_over_min": max(values) / min(values)}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="independent repeats (>= 2 for a spread)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per repeat; a repeat keeps each model's best")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="2 repeats of 1 round; prints, writes nothing")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.rounds = 2, 1
    if args.repeats < 2 or args.rounds < 1 or args.threads < 1:
        parser.error(f"need --repeats >= 2, --rounds >= 1, --threads >= 1; got {args.repeats}, {args.rounds}, "
                     f"{args.threads}")
    torch.set_num_threads(args.threads)
    lm_teacher, lm_student = M.load_tiny_lm(), M.TinyLM(STUDENT).eval()
    x = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(0))
    st = M.load_minilm()
    bert = st[0].auto_model.eval()
    bert_student = make_student(bert).eval()
    tokens = tokenize(st, sentences()[1][:64])
    models = {"tiny LM teacher": lambda: lm_teacher(x), "tiny LM student": lambda: lm_student(x),
              "MiniLM 6 layers": lambda: encode(bert, tokens), "MiniLM 2 layers": lambda: encode(bert_student, tokens)}
    work = {"tiny LM teacher": x.numel(), "tiny LM student": x.numel(), "MiniLM 6 layers": 64, "MiniLM 2 layers": 64}
    for fn in models.values():
        fn()  # warm-up
    repeats = []
    for i in range(args.repeats):
        repeats.append(one_repeat(models, args.rounds))
        r = repeats[-1]
        print(f"repeat {i + 1}/{args.repeats} (load {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}): "
              + ", ".join(f"{pair} {v:.2f}x" for pair, v in r["speedup"].items()), flush=True)
    results = {}
    for name in models:
        per_s = [work[name] / r["seconds"][name] for r in repeats]
        results[name] = {"unit": "tokens" if name.startswith("tiny") else "sentences", "work": work[name],
                         "per_s": per_s, "per_s_summary": summary(per_s)}
    speedup = {pair: {"teacher": t, "student": s, "per_repeat": [r["speedup"][pair] for r in repeats],
                      **summary([r["speedup"][pair] for r in repeats])} for pair, (t, s) in PAIRS.items()}
    for pair, v in speedup.items():
        print(f"{pair:8} speed-up over {args.repeats} repeats: {v['min']:.2f}x-{v['max']:.2f}x "
              f"(median {v['median']:.2f}x, max/min {v['max_over_min']:.2f})")
    if args.smoke:
        print("smoke run: no results file written")
        return
    path = write_result("distill_speed", {
        "settings": {"repeats": args.repeats, "rounds": args.rounds, "threads": torch.get_num_threads(),
                     "tiny_lm_batch": list(x.shape), "minilm_sentences": 64},
        "repeats": repeats, "results": results, "speedup": speedup})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
