"""Distilling the trained tiny byte LM (the teacher) into a student with ≥4× fewer parameters, against
the same student trained on the data alone — same architecture, steps, batches, schedule and seed —
for each of five training seeds.

    python benchmarks/distill_tiny_lm.py          # writes benchmarks/results/distill_tiny_lm.json (~13 min, 2 cores)
    python benchmarks/distill_tiny_lm.py --smoke  # 20 steps, one seed, 64 windows, writes nothing

Arms (identical except for the loss / the data):
* ``scratch``       — cross-entropy on the corpus (no teacher);
* ``kd``            — ``distillation_loss``: alpha·T²·KL(teacher ‖ student) + (1-alpha)·CE on the corpus;
* ``sequence-kd``   — (optional: ``--sequence-kd``) cross-entropy on sequences *sampled from the teacher*
                      (Kim & Rush, 2016), generated once before training from corpus prompts. Off by
                      default: sampling without a KV cache costs more CPU time than this run's budget.

Measured: perplexity on the tiny LM's one evaluation slice (the whole validation split,
``llmspace.models.EVAL_BYTES``: 3,205 windows of 129 bytes from files neither model trained on), scored
window by window, so that the two arms of one seed are compared by a paired bootstrap (95%,
``llmspace.evaluate.paired_bootstrap``) over windows and, since windows of one file are correlated, over
whole validation files (``groups=llmspace.models.window_files``); parameters and bytes (fp32 and fp16). A seed fixes the
student's initialisation and its batch order, identical for both arms. Speed is not measured here (the
training wall times of a shared machine say nothing): ``benchmarks/distill_speed.py`` repeats it.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace import distill as D  # noqa: E402
from llmspace import evaluate as E  # noqa: E402
from llmspace import models as M  # noqa: E402

STUDENT = M.TinyLMConfig(d_model=64, n_layers=2, n_heads=2, d_ff=256)
TRAIN = {"steps": 400, "batch_size": 32, "lr": 3e-3}
SEEDS = (0, 1, 2, 3, 4)
KD = {"temperature": 2.0, "alpha": 0.5}
SEQ_KD = {"n_sequences": 1024, "prompt_bytes": 64, "temperature": 1.0, "seed": 0}


def lr_at(step, steps, lr, warmup=100):
    """The teacher's schedule (llmspace.models.train_tiny_lm): linear warm-up, cosine to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def train_student(arm: str, teacher, data: torch.Tensor, steps, batch_size, lr, seed) -> tuple:
    """Train a fresh student; ``data`` is a 1-D byte stream (corpus) or ``(n, context+1)`` sequences."""
    torch.manual_seed(seed)
    student = M.TinyLM(STUDENT)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    offsets = torch.arange(STUDENT.context + 1)
    student.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        if data.dim() == 1:
            starts = torch.randint(0, data.numel() - STUDENT.context - 1, (batch_size,), generator=gen)
            batch = data[starts[:, None] + offsets].long()
        else:
            batch = data[torch.randint(0, data.shape[0], (batch_size,), generator=gen)]
        logits = student(batch[:, :-1])
        labels = batch[:, 1:]
        if arm == "kd":
            with torch.no_grad():
                teacher_logits = teacher(batch[:, :-1])
            loss = D.distillation_loss(logits, teacher_logits, labels, **KD)
        else:
            loss = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
    student.eval()
    return student, time.perf_counter() - start


def teacher_samples(teacher, train: torch.Tensor, n_sequences, prompt_bytes, temperature, seed) -> torch.Tensor:
    """``(n, context + 1)`` byte sequences: a corpus prompt, then the teacher's sampled continuation."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train.numel() - prompt_bytes, (n_sequences,), generator=gen)
    prompts = train[starts[:, None] + torch.arange(prompt_bytes)].long()
    out = []
    for chunk in prompts.split(256):
        out.append(D.sample_sequences(teacher, chunk, STUDENT.context + 1 - prompt_bytes, temperature, gen,
                                      context=teacher.cfg.context))
    return torch.cat(out)


def describe(model, nll) -> dict:
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "bytes_fp32": params * 4, "bytes_fp16": params * 2,
            "perplexity": math.exp(nll.mean().item())}


def main() -> None:
    global SEEDS
    smoke = "--smoke" in sys.argv
    train_cfg = dict(TRAIN, steps=20) if smoke else TRAIN
    if smoke:
        SEEDS = SEEDS[:1]
    torch.set_num_threads(2)
    start = time.perf_counter()
    corpus = M.load_corpus()
    train, val = corpus["train"], corpus["validation"][:M.EVAL_BYTES if not smoke else 64 * 129]
    teacher = M.load_tiny_lm()
    teacher_nll = M.window_nll(teacher, val)
    files = M.window_files(val).numpy()
    results = {"teacher": describe(teacher, teacher_nll)}
    print("teacher", results["teacher"], flush=True)
    plan = [("scratch", train), ("kd", train)]
    sampling_seconds = None
    if "--sequence-kd" in sys.argv:
        t0 = time.perf_counter()
        plan.append(("sequence-kd", teacher_samples(teacher, train, **SEQ_KD)))
        sampling_seconds = time.perf_counter() - t0
    runs = []
    for seed in SEEDS:
        nll = {}
        run = {"seed": seed, "students": {}}
        for arm, data in plan:
            student, seconds = train_student(arm, teacher, data, **train_cfg, seed=seed)
            nll[arm] = M.window_nll(student, val)
            run["students"][arm] = {**describe(student, nll[arm]), "vs_teacher": E.paired_bootstrap(teacher_nll, nll[arm]),
                                    "train_seconds_shared_machine": round(seconds, 1)}
            print(seed, arm, {k: run["students"][arm][k] for k in ("perplexity", "train_seconds_shared_machine")},
                  flush=True)
        run["kd_vs_scratch"] = E.paired_bootstrap(nll["scratch"], nll["kd"])
        # the same comparison resampling whole validation files (windows of one file are correlated)
        run["kd_vs_scratch_files"] = E.paired_bootstrap(nll["scratch"], nll["kd"], groups=files)
        if "sequence-kd" in nll:
            run["sequence_kd_vs_scratch"] = E.paired_bootstrap(nll["scratch"], nll["sequence-kd"])
        print(seed, "kd / scratch", {k: run["kd_vs_scratch"][k] for k in ("ratio", "ratio_low", "ratio_high")},
              flush=True)
        runs.append(run)
    ratio = results["teacher"]["parameters"] / runs[0]["students"]["scratch"]["parameters"]
    assert ratio >= 4, ratio
    if smoke:
        return
    write_result("distill_tiny_lm", {
        "settings": {"student": asdict(STUDENT), "teacher": M.tiny_lm_record()["config"], "train": TRAIN,
                     "seeds": SEEDS, "kd": KD, "sequence_kd": SEQ_KD,
                     "evaluation": "the whole validation split: llmspace.models.EVAL_BYTES = 3205 windows of 129 bytes",
                     "n_windows": int(teacher_nll.numel()),
                     "bootstrap": {"n_resamples": 2000, "confidence": 0.95, "seed": 0},
                     "tiny_lm_sha256": hashlib.sha256(M.TINY_LM_WEIGHTS.read_bytes()).hexdigest(),
                     "threads": torch.get_num_threads()},
        **results, "runs": runs, "parameter_ratio": ratio, "sequence_kd_sampling_seconds": sampling_seconds,
        "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
