"""Safe transfer of values from the sandbox to the trusted grader.

The sandbox (student code) answers in JSON only; arrays travel as ``.npy`` bytes loaded with
``allow_pickle=False`` and tensors as safetensors bytes, both base64 in the JSON. Nothing the sandbox
sends can execute code or build an object of a class outside a short allowlist (builtins, numpy arrays
and scalars, torch tensors, and dataclasses defined in ``llmspace``, rebuilt through their validating
constructors). The other direction — trusted grader to sandbox — may use (cloud)pickle: the sandbox
trusts the grader, never the reverse.

This module is copied into the sandbox, so it imports only numpy at module level.
"""
from __future__ import annotations

import base64
import builtins
import dataclasses
import importlib
import io
import math

import numpy as np

MAX_DEPTH = 32


class DecodeError(Exception):
    """The sandbox sent something that is not a value of an allowed type."""


class EncodeError(Exception):
    """A value of a type that cannot cross from the sandbox (e.g. an open file or a custom class)."""


class StudentError(Exception):
    """An exception raised by student code whose type is not one of the builtin exceptions we rebuild."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(obj, depth: int = 0):
    """A JSON-able description of ``obj`` (run in the sandbox)."""
    if depth > MAX_DEPTH:
        raise EncodeError("value nested too deeply")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        return obj if abs(obj) < 2**63 else {"__bigint__": str(obj)}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, complex):
        return {"__complex__": [obj.real, obj.imag]}
    if isinstance(obj, (list, tuple)):
        items = [encode(x, depth + 1) for x in obj]
        return items if type(obj) is list else {"__tuple__": items}
    if isinstance(obj, dict):
        return {"__dict__": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in obj.items()]}
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [encode(x, depth + 1) for x in obj]}
    if isinstance(obj, np.generic):
        return {"__npscalar__": [obj.dtype.str, encode(obj.item(), depth + 1)]}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise EncodeError("numpy arrays of Python objects cannot be transferred")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(obj), allow_pickle=False)
        return {"__ndarray__": _b64(buf.getvalue())}
    if type(obj).__module__.startswith("torch"):
        import torch
        if isinstance(obj, torch.Tensor):
            from safetensors.torch import save
            t = obj.detach().cpu().contiguous()
            if t.is_sparse or t.layout != torch.strided:
                raise EncodeError("only dense (strided) tensors can be transferred")
            return {"__tensor__": _b64(save({"t": t.clone()})), "requires_grad": bool(obj.requires_grad)}
        if isinstance(obj, torch.dtype):
            return {"__torch_dtype__": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.Size):
            return {"__tuple__": [int(s) for s in obj]}
    if isinstance(obj, np.dtype):
        return {"__np_dtype__": obj.str}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith("llmspace."):
            raise EncodeError(f"dataclass {cls.__qualname__} is not part of llmspace")
        fields = {f.name: encode(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise EncodeError(f"a value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be "
                      f"transferred to the grader")


def _unb64(text) -> bytes:
    if not isinstance(text, str):
        raise DecodeError("expected base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"bad base64: {exc}") from None


def decode(obj, depth: int = 0):
    """Rebuild a value from :func:`encode`'s output (run in the trusted grader)."""
    if depth > MAX_DEPTH:
        raise DecodeError("value nested too deeply")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode(x, depth + 1) for x in obj]
    if not isinstance(obj, dict) or len(obj) == 0:
        raise DecodeError(f"unexpected {type(obj).__name__}")
    tag = next(iter(obj))
    body = obj[tag]
    if tag == "__tuple__":
        return tuple(decode(x, depth + 1) for x in body)
    if tag == "__dict__":
        out = {}
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2:
                raise DecodeError("bad dict entry")
            key = decode(pair[0], depth + 1)
            try:
                hash(key)
            except TypeError:
                raise DecodeError("unhashable dict key") from None
            out[key] = decode(pair[1], depth + 1)
        return out
    if tag == "__set__":
        return {decode(x, depth + 1) for x in body}
    if tag == "__bigint__":
        return int(body)
    if tag == "__float__":
        if body not in ("nan", "inf", "-inf"):
            raise DecodeError("bad float")
        return float(body)
    if tag == "__complex__":
        return complex(float(body[0]), float(body[1]))
    if tag == "__npscalar__":
        dtype = np.dtype(str(body[0]))
        if dtype.hasobject:
            raise DecodeError("object scalar")
        return dtype.type(decode(body[1], depth + 1))
    if tag == "__ndarray__":
        try:
            return np.load(io.BytesIO(_unb64(body)), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(f"bad array: {exc}") from None
    if tag == "__np_dtype__":
        dtype = np.dtype(str(body))
        if dtype.hasobject:
            raise DecodeError("object dtype")
        return dtype
    if tag == "__tensor__":
        from safetensors.torch import load
        try:
            t = load(_unb64(body))["t"]
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(f"bad tensor: {exc}") from None
        return t.requires_grad_(bool(obj.get("requires_grad"))) if t.is_floating_point() else t
    if tag == "__torch_dtype__":
        import torch
        dtype = getattr(torch, str(body), None)
        if not isinstance(dtype, torch.dtype):
            raise DecodeError("bad torch dtype")
        return dtype
    if tag == "__dataclass__":
        module_name, _, qualname = str(body).partition(":")
        if not module_name.startswith("llmspace.") or "." in qualname:
            raise DecodeError(f"class {body} is not an llmspace dataclass")
        cls = getattr(importlib.import_module(module_name), qualname, None)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise DecodeError(f"{body} is not a dataclass")
        fields = obj.get("fields")
        if not isinstance(fields, dict):
            raise DecodeError("bad dataclass fields")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        if set(fields) - names:
            raise DecodeError(f"unknown fields for {qualname}: {sorted(set(fields) - names)}")
        # through the constructor: the reference class validates what the student built
        return cls(**{k: decode(v, depth + 1) for k, v in fields.items()})
    raise DecodeError(f"unknown tag {tag!r}")


_BUILTIN_EXCEPTIONS = {name: cls for name, cls in vars(builtins).items()
                       if isinstance(cls, type) and issubclass(cls, Exception)}


def _constructible(cls) -> bool:
    """Whether ``cls(message)`` works (``UnicodeDecodeError`` needs five arguments)."""
    try:
        cls("m")
    except Exception:  # noqa: BLE001
        return False
    return True


def decode_exception(info: dict) -> BaseException:
    """An exception object standing for one raised in the sandbox.

    ``isinstance`` semantics survive the boundary: the worker sends the built-in classes of the
    exception's MRO (``"builtins"``, most derived first); the grader rebuilds the exact built-in when the
    exception was one, and otherwise a class of the student's name deriving from the most derived built-in
    that takes a message (and from :class:`StudentError`). So ``class HeaderError(ValueError)`` or
    ``json.JSONDecodeError`` satisfies ``except ValueError``, ``UnicodeDecodeError`` satisfies
    ``except UnicodeError`` and ``except ValueError``. Only ``Exception`` subclasses are rebuilt: a
    ``KeyboardInterrupt`` or ``SystemExit`` from the sandbox becomes a plain :class:`StudentError`."""
    name = str(info.get("type", "Exception"))[:100]
    message = str(info.get("message", ""))[:2000]
    names = info.get("builtins")
    names = [str(n) for n in names[:16]] if isinstance(names, list) else [name]
    bases = [_BUILTIN_EXCEPTIONS[n] for n in names if n in _BUILTIN_EXCEPTIONS]
    if bases and bases[0].__name__ == name and _constructible(bases[0]):
        return bases[0](message)                     # the exception was this built-in itself
    base = next((b for b in bases if b is not Exception and _constructible(b)), None)
    safe_name = name if name.isidentifier() else "StudentError"
    if base is None:
        return type(safe_name, (StudentError,), {})(message)  # keeps the student's exception name
    # a str() of the message as given (KeyError's own __str__ would add quotes)
    return type(safe_name, (base, StudentError), {"__str__": Exception.__str__})(message)
