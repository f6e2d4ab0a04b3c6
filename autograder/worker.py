"""The sandboxed side of grading: runs a student's notebook cells and calls their functions on request.

Started by :mod:`autograder.sandbox` (by bubblewrap, in an allow-list root, inside namespaces, as an
unprivileged user, in a cgroup and under rlimits) as ``python worker.py CMD_FD REPLY_FD``. It reads commands from CMD_FD and answers on REPLY_FD, one frame
each (4-byte big-endian length + payload). Commands are pickles from the trusted grader; replies are JSON
produced by :mod:`codec` — the only thing the grader ever reads from here. Cell output is captured with
a size cap; stdout/stderr file descriptors point at a capped log, never at the grader.

Commands: ``{"op": "run", "source": str}``, ``{"op": "call", "name": str, "args": tuple, "kwargs": dict}``,
``{"op": "defined", "name": str}``, ``{"op": "exit"}``.
"""
import json
import os
import pickle
import struct
import sys
import traceback
import warnings

import codec

OUTPUT_CAP = 64 * 1024  # characters of captured output kept per cell


class CappedWriter:
    """A text stream that keeps the first OUTPUT_CAP characters and counts the rest."""

    def __init__(self):
        self.parts, self.size, self.dropped = [], 0, 0

    def write(self, text):
        text = str(text)
        room = OUTPUT_CAP - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(len(text), room)
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False

    def value(self):
        tail = f"\n[... {self.dropped} more characters of output dropped]" if self.dropped else ""
        return "".join(self.parts) + tail


def read_frame(fd):
    header = _read_exact(fd, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    return _read_exact(fd, length)


def _read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def write_frame(fd, payload: dict):
    data = json.dumps(payload).encode()
    os.write(fd, struct.pack(">I", len(data)))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _exception_info(exc):
    """Name, message and the built-in classes of the exception's MRO (most derived first), so that the
    grader can rebuild something ``isinstance`` of the same built-ins (e.g. a student's
    ``class HeaderError(ValueError)`` or ``json.JSONDecodeError`` still counts as a ValueError)."""
    builtin = [c.__name__ for c in type(exc).__mro__
               if c.__module__ == "builtins" and issubclass(c, BaseException)]
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "builtins": builtin[:16]}


_MAIN_PID = os.getpid()


def _exit_if_forked():
    # A process the notebook forked returns here after its cell; it must not speak the protocol.
    if os.getpid() != _MAIN_PID:
        os._exit(0)


def main():
    cmd_fd, reply_fd = int(sys.argv[1]), int(sys.argv[2])
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance(colors="nocolor")
    shell.history_manager.enabled = False
    write_frame(reply_fd, {"ok": True, "ready": True, "pid": os.getpid()})
    while True:
        frame = read_frame(cmd_fd)
        if frame is None:
            return
        cmd = pickle.loads(frame)
        op = cmd.get("op")
        if op == "exit":
            return
        if op == "run":
            out = CappedWriter()
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = out
            try:
                result = shell.run_cell(cmd["source"], store_history=False, silent=False)
            finally:
                _exit_if_forked()
                sys.stdout, sys.stderr = saved
            error = result.error_in_exec or result.error_before_exec
            write_frame(reply_fd, {"ok": error is None, "output": out.value(),
                                   "error": None if error is None else _exception_info(error)})
        elif op == "defined":
            write_frame(reply_fd, {"ok": True, "defined": callable(shell.user_ns.get(cmd["name"]))})
        elif op == "call":
            fn = shell.user_ns.get(cmd["name"])
            if not callable(fn):
                write_frame(reply_fd, {"ok": False, "undefined": True})
                continue
            args = pickle.loads(cmd["args"])
            kwargs = pickle.loads(cmd["kwargs"]) if "kwargs" in cmd else {}
            out = CappedWriter()
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = out
            try:
                with warnings.catch_warnings(record=True) as caught:   # the grader re-emits them
                    warnings.simplefilter("always")
                    result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - SystemExit from student code is an answer too
                _exit_if_forked()
                sys.stdout, sys.stderr = saved
                write_frame(reply_fd, {"ok": False, "exception": _exception_info(exc)})
                continue
            finally:
                _exit_if_forked()
                sys.stdout, sys.stderr = saved
            try:
                reply = {"ok": True, "result": _encode_result(result, args),
                         "args_after": [_encode_mutable(a) for a in args],
                         "warnings": [{"category": w.category.__name__, "message": str(w.message)[:500]}
                                      for w in caught[:10]]}
            except codec.EncodeError as exc:
                reply = {"ok": False, "exception": {"type": "TypeError", "message": str(exc)}}
            except Exception as exc:  # noqa: BLE001
                reply = {"ok": False, "exception": _exception_info(exc)}
            write_frame(reply_fd, reply)
        else:
            write_frame(reply_fd, {"ok": False, "error": {"type": "ValueError", "message": f"bad op {op!r}"}})


def _encode_result(result, args):
    for i, a in enumerate(args):  # a function that returns (one of) its argument(s), e.g. a module
        if result is a and not isinstance(a, (int, float, str, bool, type(None))):
            return {"__same_as_arg__": i}
    return codec.encode(result)


def _encode_mutable(arg):
    """State of an argument after the call, for in-place semantics (arrays, tensors, modules, dict, list)."""
    try:
        import torch
        if isinstance(arg, torch.nn.Module):
            return {"__state_dict__": codec.encode(dict(arg.state_dict()))}
    except ImportError:
        pass
    if isinstance(arg, (list, dict)) or type(arg).__name__ in ("ndarray", "Tensor"):
        try:
            return codec.encode(arg)
        except codec.EncodeError:
            return None
    return None


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - a broken worker is reported as kernel_died by the grader
        traceback.print_exc()
        sys.exit(3)
