"""Safe transfer of values from the sandbox to the trusted grader.

The sandbox (student code) answers in JSON only; arrays travel as ``.npy`` bytes loaded with
``allow_pickle=False`` and tensors as safetensors bytes, both base64 in the JSON. Nothing the sandbox
sends can execute code or build an object of a class outside a short allowlist (builtins, numpy arrays
and scalars, torch tensors, and dataclasses defined in ``llmspace``, rebuilt through their validating
constructors). The other direction — trusted grader to sandbox — may use (cloud)pickle: the sandbox
trusts the grader, never the reverse.

Sizes are bounded on both sides, so that a legal but huge reply cannot make the grader allocate many
times its size (a JSON ``[],`` is 3 bytes but ~64 bytes of Python objects): :func:`loads` counts a
reply's elements before parsing it, :func:`decode` keeps a budget of elements, checks every array's
header against its data before allocating, and turns every malformed value into :class:`DecodeError`.

This module is copied into the sandbox, so it imports only numpy at module level.
"""
from __future__ import annotations

import base64
import builtins
import dataclasses
import importlib
import io
import json
import math
import re

import numpy as np

MAX_DEPTH = 32
MAX_ITEMS = 1_000_000            # JSON containers + elements in one reply (encode enforces it too)
MAX_BIGINT_DIGITS = 4000         # below CPython's int <-> str conversion limit (4300 digits)
MAX_ARRAY_BYTES = 256 * 2**20    # data of one array or tensor
ARRAY_KINDS = "biufcSU"          # bool, signed/unsigned integers, floats, complex, bytes, str
_INT = re.compile(r"-?[0-9]{1,%d}" % MAX_BIGINT_DIGITS)


class DecodeError(Exception):
    """The sandbox sent something that is not a value of an allowed type (or too much of it)."""


class TooLarge(DecodeError):
    """A reply or value beyond the bounds (elements, bytes)."""


class EncodeError(Exception):
    """A value of a type that cannot cross from the sandbox (e.g. an open file or a custom class)."""


class StudentError(Exception):
    """An exception raised by student code whose type is not one of the builtin exceptions we rebuild."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Budget:
    """Elements left for one value: every container and element costs one."""

    def __init__(self, items: int, error: type):
        self.left, self.error = items, error

    def take(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise self.error(f"the value has more than {MAX_ITEMS} elements (return an array or tensor "
                             f"instead of a long list)")


def encode(obj, depth: int = 0, budget: _Budget | None = None):
    """A JSON-able description of ``obj`` (run in the sandbox). At most :data:`MAX_ITEMS` elements."""
    if budget is None:
        budget = _Budget(MAX_ITEMS, EncodeError)
    budget.take()
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
        items = [encode(x, depth + 1, budget) for x in obj]
        return items if type(obj) is list else {"__tuple__": items}
    if isinstance(obj, dict):
        return {"__dict__": [[encode(k, depth + 1, budget), encode(v, depth + 1, budget)]
                             for k, v in obj.items()]}
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [encode(x, depth + 1, budget) for x in obj]}
    if isinstance(obj, np.generic):
        return {"__npscalar__": [obj.dtype.str, encode(obj.item(), depth + 1, budget)]}
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
        fields = {f.name: encode(getattr(obj, f.name), depth + 1, budget) for f in dataclasses.fields(obj)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise EncodeError(f"a value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be "
                      f"transferred to the grader")


def loads(payload: bytes, max_items: int = MAX_ITEMS, what: str = "a reply"):
    """Parse one reply frame (run in the trusted grader), refusing it *before* parsing when it holds more
    than ``max_items`` JSON elements: every element after the first starts after a ``[``, ``{`` or ``,``
    byte, so their count bounds the objects the parser would build (``,`` inside strings only make the
    bound looser). Memory used is then at most ~100 bytes per element plus a few times the reply."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError(f"a reply must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    count = payload.count(b"[") + payload.count(b"{") + payload.count(b",")
    if count > max_items:
        raise TooLarge(f"{what} of {len(payload)} bytes with up to {count} elements (the limit is "
                       f"{max_items} elements)")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} that is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"{what} that is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def _unb64(text) -> bytes:
    if not isinstance(text, str):
        raise DecodeError("expected base64 text")
    if len(text) > (MAX_ARRAY_BYTES + 2**20) * 4 // 3:
        raise TooLarge(f"more than {MAX_ARRAY_BYTES} bytes of array data")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"bad base64: {exc}") from None


def _allowed_dtype(dtype) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except Exception as exc:  # noqa: BLE001 - TypeError, ValueError, SyntaxError from odd strings
        raise DecodeError(f"bad dtype: {str(exc)[:100]}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in ARRAY_KINDS:
        raise DecodeError(f"dtype {dtype.str!r} is not allowed (object, structured or unknown)")
    if dtype.kind in "SU" and dtype.itemsize == 0:
        raise DecodeError("zero-size string dtype")
    return dtype


def _load_npy(data: bytes) -> np.ndarray:
    """An array from ``.npy`` bytes, its header checked against the data *before* anything is allocated
    (``np.load`` would allocate what the header claims)."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise DecodeError(f"npy version {version}")
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"bad array: {str(exc)[:200]}") from None
    try:
        dtype = _allowed_dtype(dtype)
    except DecodeError as exc:
        raise DecodeError(f"bad array: {exc}") from None
    if len(shape) > MAX_DEPTH or any(not isinstance(s, int) or s < 0 for s in shape):
        raise DecodeError(f"bad array shape {shape!r:.100}")
    count = math.prod(shape)
    body = data[fp.tell():]
    if count * dtype.itemsize != len(body) or len(body) > MAX_ARRAY_BYTES:
        raise DecodeError(f"bad array: shape {shape} of {dtype.str} needs {count * dtype.itemsize} bytes, "
                          f"got {len(body)} (limit {MAX_ARRAY_BYTES})")
    array = np.frombuffer(body, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C").copy(order="K")


def _fields(obj: dict, tag: str, allowed: tuple = ()) -> None:
    extra = set(obj) - {tag, *allowed}
    if extra:
        raise DecodeError(f"unexpected keys {sorted(map(str, extra))[:5]} with {tag}")


def decode(obj, depth: int = 0, budget: _Budget | None = None):
    """Rebuild a value from :func:`encode`'s output (run in the trusted grader).

    Raises :class:`DecodeError` for anything that is not such a value or exceeds the bounds (elements,
    depth, array sizes); an llmspace dataclass's own constructor may raise ``TypeError``/``ValueError``.
    """
    if budget is None:
        budget = _Budget(MAX_ITEMS, TooLarge)
    budget.take()
    if depth > MAX_DEPTH:
        raise DecodeError("value nested too deeply")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode(x, depth + 1, budget) for x in obj]
    if not isinstance(obj, dict) or len(obj) == 0:
        raise DecodeError(f"unexpected {type(obj).__name__}")
    tag = next(iter(obj))
    body = obj[tag]
    if tag in ("__tuple__", "__set__", "__dict__") and not isinstance(body, list):
        raise DecodeError(f"{tag} must hold a list")
    if tag == "__tuple__":
        _fields(obj, tag)
        return tuple(decode(x, depth + 1, budget) for x in body)
    if tag == "__dict__":
        _fields(obj, tag)
        out = {}
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2:
                raise DecodeError("bad dict entry")
            key = decode(pair[0], depth + 1, budget)
            try:
                hash(key)
            except TypeError:
                raise DecodeError("unhashable dict key") from None
            out[key] = decode(pair[1], depth + 1, budget)
        return out
    if tag == "__set__":
        _fields(obj, tag)
        items = [decode(x, depth + 1, budget) for x in body]
        try:
            return set(items)
        except TypeError:
            raise DecodeError("unhashable set element") from None
    if tag == "__bigint__":
        _fields(obj, tag)
        if not isinstance(body, str) or not _INT.fullmatch(body):
            raise DecodeError(f"bad integer (at most {MAX_BIGINT_DIGITS} digits)")
        return int(body)
    if tag == "__float__":
        _fields(obj, tag)
        if body not in ("nan", "inf", "-inf"):
            raise DecodeError("bad float")
        return float(body)
    if tag == "__complex__":
        _fields(obj, tag)
        if (not isinstance(body, list) or len(body) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in body)):
            raise DecodeError("bad complex")
        return complex(float(body[0]), float(body[1]))
    if tag == "__npscalar__":
        _fields(obj, tag)
        if not isinstance(body, list) or len(body) != 2 or not isinstance(body[0], str):
            raise DecodeError("bad numpy scalar")
        dtype = _allowed_dtype(body[0])
        value = decode(body[1], depth + 1, budget)
        if not isinstance(value, (bool, int, float, complex, str, bytes)):
            raise DecodeError("bad numpy scalar value")
        try:
            return dtype.type(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise DecodeError(f"bad numpy scalar: {str(exc)[:100]}") from None
    if tag == "__ndarray__":
        _fields(obj, tag)
        return _load_npy(_unb64(body))
    if tag == "__np_dtype__":
        _fields(obj, tag)
        if not isinstance(body, str):
            raise DecodeError("bad dtype")
        return _allowed_dtype(body)
    if tag == "__tensor__":
        _fields(obj, tag, ("requires_grad",))
        from safetensors.torch import load
        try:
            tensors = load(_unb64(body))
            t = tensors["t"]
            if len(tensors) != 1:
                raise ValueError("more than one tensor")
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(f"bad tensor: {str(exc)[:200]}") from None
        return t.requires_grad_(obj.get("requires_grad") is True) if t.is_floating_point() else t
    if tag == "__torch_dtype__":
        _fields(obj, tag)
        import torch
        dtype = getattr(torch, body, None) if isinstance(body, str) and body.isidentifier() else None
        if not isinstance(dtype, torch.dtype):
            raise DecodeError("bad torch dtype")
        return dtype
    if tag == "__dataclass__":
        _fields(obj, tag, ("fields",))
        if not isinstance(body, str):
            raise DecodeError("bad dataclass name")
        module_name, _, qualname = body.partition(":")
        if (not module_name.startswith("llmspace.") or not qualname.isidentifier()
                or not all(p.isidentifier() for p in module_name.split("."))):
            raise DecodeError(f"class {body[:200]!r} is not an llmspace dataclass")
        try:
            cls = getattr(importlib.import_module(module_name), qualname, None)
        except ImportError:
            raise DecodeError(f"class {body[:200]!r} is not an llmspace dataclass") from None
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise DecodeError(f"{body} is not a dataclass")
        fields = obj.get("fields")
        if not isinstance(fields, dict):
            raise DecodeError("bad dataclass fields")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        if set(fields) - names:
            raise DecodeError(f"unknown fields for {qualname}: {sorted(set(fields) - names)[:10]}")
        # through the constructor: the reference class validates what the student built
        return cls(**{k: decode(v, depth + 1, budget) for k, v in fields.items()})
    raise DecodeError(f"unknown tag {str(tag)[:100]!r}")


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
