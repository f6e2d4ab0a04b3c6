"""Mutation score of the graded checks: how many small bugs planted in the reference solutions they catch.

For every graded task, the reference function's solution region (between ``### BEGIN SOLUTION`` and
``### END SOLUTION`` in ``solutions/llmspace/<topic>.py``) is mutated one change at a time on its AST:

* operators: ``+ -``, ``* /``, ``// /``, ``% //``, ``** *``, ``| &``, ``<< >>`` swapped, also in ``x op= y``;
* comparisons: ``<`` ↔ ``<=``, ``>`` ↔ ``>=``, ``==`` ↔ ``!=``, ``is`` ↔ ``is not``, ``in`` ↔ ``not in``;
  ``and`` ↔ ``or``; ``not x`` → ``x``; ``-x`` → ``x``;
* constants: an int ``n`` → ``n + 1`` and ``n - 1`` (0 → 1 only), a float ``x`` → ``2x`` (0.0 → 1.0),
  ``True`` ↔ ``False``;
* statements: each statement of the region (at any depth) replaced by ``pass``.

Nothing inside an f-string is mutated: that would change only the text of an error message.

Each mutant is compiled into a copy of the module's namespace (so helpers and the other tasks stay the
reference's) and graded by the task's check, visible and hidden cases, as the grader does — in a forked
process with a wall-clock limit. A mutant is *killed* when the check fails it (or it crashes the check,
which the grader also scores 0), *timeout* when it runs past the limit (the grader's per-call limit kills
it too), *survived* when it gets full marks. Survivors are listed; those shown by hand to compute the same
function as the reference are listed in :data:`EQUIVALENT` with the reason and are left out of the score.

    nice python benchmarks/mutation_score.py                    # every assignment → results/mutation_score.json
    nice python benchmarks/mutation_score.py --assignment ex01_sparse --task csr_matvec --no-write
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib
import inspect
import os
import pickle
import select
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "solutions"), str(ROOT), str(ROOT / "benchmarks")]

from autograder.checks import CheckFailed  # noqa: E402
from autograder.specs import all_assignments  # noqa: E402

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"

# (task, change, a piece of the mutated line, column of the mutated node or None for any) -> why the
# mutant computes the same function as the reference (checked by hand). Matched on the line's text and
# the column, not the line number, so edits elsewhere in the file keep an entry valid.
EQUIVALENT: dict[tuple[str, str, str, int | None], str] = {
    ("csr_matvec", "False->True", "astype(dtype, copy=False)", None):
        "astype(copy=True) copies the freshly gathered array once more; the values are the same",
    ("llm_int8_matmul", "127->128", ".clamp(-127, 127)", None):
        "scale = absmax / 127, so |round(x / scale)| <= 127 already: the upper clamp never acts",
    ("llm_int8_matmul", "0->1", "xr.shape[0] == 0 or wr.shape[0] == 0", 36):
        "xr.shape[1] (instead of [0]) == 0 repeats the first clause of the condition",
    ("llm_int8_matmul", "0->1", "xr.shape[0] == 0 or wr.shape[0] == 0", 56):
        "wr.shape[1] (instead of [0]) == 0 equals xr.shape[1] == 0 (x and weight share K), the first clause",
    ("llm_int8_matmul", "delete Assign", "x, weight = x.float(), weight.float()", None):
        "choose_qparams and the fp16 casts convert to float32 anyway and the result is float32; only a "
        "float64 quotient x / scale exactly at a rounding tie could round differently",
    ("replay_on_segment", "0->1", "op must start with 'malloc' or 'free', got {op[0]!r}", None):
        "changes only the text of the error message",
    ("replay_on_segment", "1->0", "free of {op[1]!r}, which is not allocated", None):
        "changes only the text of the error message",
    ("zero1_adam_step", "Sub->Add", "pad = shard * n_ranks - n", None):
        "more zero padding: every rank still slices its shard at r * shard and the result is cut to n",
    ("quantize", "Gt->GtE", "return qmax if ratio > 0 else qmin", None):
        "ratio is +inf or -inf here, never 0",
    ("quantize", "0->1", "return qmax if ratio > 0 else qmin", None):
        "ratio is +inf or -inf here: > 1 and > 0 agree",
    # ex04/ex06 (helper checks2)
    ("compress_2to4", "drop USub", "pad = (-pos.shape[1]) % 4", None):
        "pos.shape[1] = cols / 2 is even, so it is 0 or 2 mod 4, where x % 4 == (-x) % 4",
    ("compress_2to4", "4->5", "key = (groups == 0).to(torch.int64) * 4 + torch.arange(4", None):
        "any factor >= 4 still sorts every non-zero position (keys 0..3) before every zero one",
    ("parse_safetensors_header", "delete If", "if size < 8:", None):
        "a file shorter than 8 bytes has 8 + n > size for every n: the next check raises ValueError",
    ("parse_safetensors_header", "delete Raise", "raise ValueError(f\"truncated file:", None):
        "a file shorter than 8 bytes has 8 + n > size for every n: the next check raises ValueError",
    ("parse_safetensors_header", "8->7", "if size < 8:", None):
        "a 7-byte file has 8 + n > 7 for every n: the next check raises ValueError",
    ("parse_safetensors_header", "Lt->LtE", "if size < 8:", None):
        "an 8-byte file is always invalid: n > 0 fails 8 + n > size, n = 0 fails json.loads (ValueError)",
    ("parse_safetensors_header", "8->9", "if size < 8:", None):
        "an 8-byte file is always invalid: n > 0 fails 8 + n > size, n = 0 fails json.loads (ValueError)",
    ("parse_safetensors_header", "delete If", "if 8 + n > size:", None):
        "a length past the end makes data_size = size - 8 - n negative; the coverage walk then raises "
        "ValueError (the slice buf[8:8 + n] allocates no more than the file)",
    ("parse_safetensors_header", "delete Raise", "is larger than the file: only", None):
        "a length past the end makes data_size negative; the coverage walk then raises ValueError",
    ("parse_safetensors_header", "Add->Sub", "if 8 + n > size:", None):
        "8 - n > size never holds: as deleting the check, the coverage walk raises on a negative data_size",
    ("parse_safetensors_header", "8->7", "if 8 + n > size:", None):
        "7 + n > size misses only n = size - 7, where data_size = -1 and the coverage walk raises",
    ("parse_safetensors_header", "delete If", "if offsets[1] > data_size:", None):
        "an end past the data section leaves the coverage walk past data_size, which raises ValueError",
    ("parse_safetensors_header", "delete Raise", "are out of bounds: the data", None):
        "an end past the data section leaves the coverage walk past data_size, which raises ValueError",
    ("parse_safetensors_header", "1->0", "if offsets[1] > data_size:", None):
        "an end past the data section leaves the coverage walk past data_size, which raises ValueError",
    ("parse_safetensors_header", "0->1", "or not 0 <= offsets[0] <= offsets[1]):", 36):
        "0 <= offsets[1] <= offsets[1]: begin > end then fails the byte-count check (end - begin < 0) and "
        "a negative begin the coverage walk (it starts at 0)",
    ("parse_safetensors_header", "1->0", "or not 0 <= offsets[0] <= offsets[1]):", 50):
        "0 <= begin <= begin: begin > end then fails the byte-count check (end - begin < 0 != prod * size)",
    ("parse_safetensors_header", "Sub->Add", "is larger than the file: only {size - 8} bytes", None):
        "changes only the text of the error message",
    ("parse_safetensors_header", "8->9", "is larger than the file: only {size - 8} bytes", None):
        "changes only the text of the error message",
    ("parse_safetensors_header", "8->7", "is larger than the file: only {size - 8} bytes", None):
        "changes only the text of the error message",
    ("parse_safetensors_header", "Sub->Add", "{data_size - position} trailing bytes", None):
        "changes only the text of the error message",
    ("parse_safetensors_header", "Sub->Add", "span {offsets[1] - offsets[0]}", None):
        "changes only the text of the error message",
    ("parse_safetensors_header", "1->0", "span {offsets[1] - offsets[0]}", None):
        "changes only the text of the error message",
    ("parse_safetensors_header", "0->1", "span {offsets[1] - offsets[0]}", None):
        "changes only the text of the error message",
    ("read_tensor", "delete If", "if name not in tensors:", None):
        "tensors[name] raises KeyError for a missing name anyway (only the message is plainer)",
    ("read_tensor", "delete Raise", "raise KeyError(f\"no tensor named", None):
        "tensors[name] raises KeyError for a missing name anyway (only the message is plainer)",
}


def equivalent(task: str, mutant_id: str, line: str) -> str | None:
    where, change = mutant_id.split(" ", 1)
    column = int(where.split(":")[1])
    for (t, c, piece, col), why in EQUIVALENT.items():
        if t == task and c == change and piece in line and col in (None, column):
            return why
    return None

_SWAP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
             ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr,
             ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.BitXor: ast.BitOr, ast.MatMult: ast.Mult}
_SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


def solution_lines(source: str, function: ast.FunctionDef) -> tuple[int, int]:
    """1-based line numbers strictly between the markers inside ``function``."""
    lines = source.splitlines()
    begin = end = None
    for number in range(function.lineno, min(function.end_lineno + 3, len(lines)) + 1):  # END follows the body
        text = lines[number - 1].strip()
        if text == BEGIN:
            begin = number
        elif text == END:
            end = number
    if begin is None or end is None:
        raise ValueError(f"{function.name}: no solution region")
    return begin, end


def _in_region(node, region) -> bool:
    return hasattr(node, "lineno") and region[0] < node.lineno and node.end_lineno < region[1]


def mutation_sites(function: ast.FunctionDef, region) -> list[tuple[str, callable]]:
    """(id, apply) pairs: ``apply(tree_copy)`` mutates the copy of ``function`` in place."""
    sites = []
    in_fstring = {id(d) for n in ast.walk(function) if isinstance(n, ast.JoinedStr) for d in ast.walk(n)}
    nodes = [n for n in ast.walk(function) if _in_region(n, region) and id(n) not in in_fstring]
    index = {id(n): i for i, n in enumerate(ast.walk(function))}

    def at(node):
        i = index[id(node)]
        return lambda tree: list(ast.walk(tree))[i]

    for node in nodes:
        where = f"L{node.lineno}:{node.col_offset}"
        get = at(node)
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _SWAP_BIN:
            new = _SWAP_BIN[type(node.op)]
            sites.append((f"{where} {type(node.op).__name__}->{new.__name__}",
                          lambda t, g=get, n=new: setattr(g(t), "op", n())))
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in _SWAP_CMP:
                    new = _SWAP_CMP[type(op)]

                    def apply(t, g=get, k=k, n=new):
                        g(t).ops[k] = n()
                    sites.append((f"{where} {type(op).__name__}->{new.__name__}", apply))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            sites.append((f"{where} {type(node.op).__name__}->{new.__name__}",
                          lambda t, g=get, n=new: setattr(g(t), "op", n())))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            def drop(t, g=get):
                target = g(t)
                if isinstance(target.op, ast.Not):      # not x -> +bool(x): same truth value as x
                    target.operand = ast.Call(ast.Name("bool", ast.Load()), [target.operand], [])
                target.op = ast.UAdd()
            sites.append((f"{where} drop {type(node.op).__name__}", drop))
        elif isinstance(node, ast.Constant) and not isinstance(node.value, str) and node.value is not None:
            value = node.value
            if isinstance(value, bool):
                changes = [not value]
            elif isinstance(value, int):
                changes = [1] if value == 0 else [value + 1, value - 1]
            elif isinstance(value, float):
                changes = [1.0] if value == 0 else [value * 2]
            else:
                changes = []
            for new in changes:
                sites.append((f"{where} {value!r}->{new!r}", lambda t, g=get, v=new: setattr(g(t), "value", v)))
        if isinstance(node, ast.stmt) and not isinstance(node, ast.FunctionDef):
            def delete(t, g=get):
                target = g(t)
                for parent in ast.walk(t):
                    for field, value in ast.iter_fields(parent):
                        if isinstance(value, list) and any(v is target for v in value):
                            value[[i for i, v in enumerate(value) if v is target][0]] = ast.Pass()
                            return
            sites.append((f"{where} delete {type(node).__name__}", delete))
    return sites


def build_mutant(module, function: ast.FunctionDef, apply) -> callable:
    tree = copy.deepcopy(function)
    apply(tree)
    tree.decorator_list = []
    code = compile(ast.fix_missing_locations(ast.Module([tree], [])), f"<mutant of {function.name}>", "exec")
    namespace = dict(vars(module))
    exec(code, namespace)
    return namespace[function.name]


def _grade(check, fn) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            check(fn)
            check(fn, hidden=True)
        except CheckFailed:
            return "killed"
        except Exception:  # noqa: BLE001 - the grader scores a check's crash as 0 too
            return "killed"
    return "survived"


def grade_in_child(check, fn, timeout: float) -> str:
    """Run the check in a forked child (a mutant may loop forever or corrupt global state)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            outcome = _grade(check, fn)
        except BaseException:  # noqa: BLE001
            outcome = "killed"
        os.write(write, pickle.dumps(outcome))
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], timeout)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        return "timeout"
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return pickle.loads(data) if data else "killed"   # died without answering: a crash


def score_task(assignment, task: str, timeout: float, log=print) -> dict:
    # One intra-op thread: a child forked after torch ran a parallel op (the reference's warm-up) can hang
    # in the inherited OpenMP pool until the timeout (seen on paged_kv_gather's 700-token case under pytest).
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _score_task(assignment, task, timeout, log)
    finally:
        torch.set_num_threads(threads)


def _score_task(assignment, task: str, timeout: float, log=print) -> dict:
    spec = next(t for t in assignment.tasks if t.function == task)
    module = importlib.import_module(spec.module or assignment.module)   # e.g. simulate_lru: llmspace.tiered
    check = getattr(importlib.import_module(f"autograder.checks.{assignment.topic}"), f"check_{task}")
    source = Path(inspect.getsourcefile(module)).read_text()
    function = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == task)
    region = solution_lines(source, function)
    # the reference must pass (and warms the checks' caches before forking)
    reference = _grade(check, getattr(module, task))
    if reference != "survived":
        raise RuntimeError(f"{task}: the reference itself fails its check")
    counts = {"killed": 0, "survived": 0, "timeout": 0, "equivalent": 0, "invalid": 0}
    survivors = []
    start = time.perf_counter()
    for mutant_id, apply in mutation_sites(function, region):
        try:
            fn = build_mutant(module, function, apply)
        except Exception:  # noqa: BLE001 - e.g. a deleted statement leaves a name undefined at compile time
            counts["invalid"] += 1
            continue
        outcome = grade_in_child(check, fn, timeout)
        line = source.splitlines()[int(mutant_id.split(":")[0][1:]) - 1].strip()
        if outcome == "survived" and equivalent(task, mutant_id, line):
            outcome = "equivalent"
        counts[outcome] += 1
        if outcome == "survived":
            survivors.append({"mutant": mutant_id, "line": line})
            log(f"  survived {task}: {mutant_id}: {line}")
    scored = counts["killed"] + counts["survived"] + counts["timeout"]
    return {"assignment": assignment.name, "task": task, **counts,
            "score": (counts["killed"] + counts["timeout"]) / scored if scored else None,
            "survivors": survivors, "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assignment", action="append", help="e.g. ex01_sparse (repeatable; default: all)")
    parser.add_argument("--task", action="append", help="a task function name (repeatable)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per mutant (default 30)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results JSON")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    results = []
    for assignment in all_assignments().values():
        if args.assignment and assignment.name not in args.assignment:
            continue
        for t in assignment.tasks:
            if args.task and t.function not in args.task:
                continue
            try:
                r = score_task(assignment, t.function, args.timeout)
            except Exception:  # noqa: BLE001 - report and go on with the next task
                traceback.print_exc()
                continue
            results.append(r)
            print(f"{assignment.name} {t.function}: killed {r['killed']}, timeout {r['timeout']}, "
                  f"survived {r['survived']}, equivalent {r['equivalent']}, invalid {r['invalid']} "
                  f"→ {100 * (r['score'] or 0):.1f}% ({r['seconds']} s)", flush=True)
    per_assignment = {}
    for r in results:
        a = per_assignment.setdefault(r["assignment"], {"killed": 0, "timeout": 0, "survived": 0, "equivalent": 0})
        for k in a:
            a[k] += r[k]
    for a in per_assignment.values():
        scored = a["killed"] + a["timeout"] + a["survived"]
        a["score"] = (a["killed"] + a["timeout"]) / scored if scored else None
    total = {k: sum(a[k] for a in per_assignment.values()) for k in ("killed", "timeout", "survived", "equivalent")}
    scored = total["killed"] + total["timeout"] + total["survived"]
    total["score"] = (total["killed"] + total["timeout"]) / scored if scored else None
    for name, a in per_assignment.items():
        print(f"{name}: {100 * (a['score'] or 0):.1f}% of {a['killed'] + a['timeout'] + a['survived']} mutants")
    print(f"total: {100 * (total['score'] or 0):.1f}% of {scored} non-equivalent mutants "
          f"({total['survived']} survived)")
    if not args.no_write and not args.task and not args.assignment:
        from common import write_result
        path = write_result("mutation_score", {
            "settings": {"timeout_s": args.timeout, "operators": "binop/compare/boolop/unary swaps, "
                         "int ±1, float ×2, bool flip, statement → pass"},
            "equivalent": [{"task": t, "change": c, "line": piece, "column": col, "why": why}
                           for (t, c, piece, col), why in EQUIVALENT.items()],
            "total": total, "per_assignment": per_assignment, "per_task": results})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
