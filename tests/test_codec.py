"""The sandbox → grader codec accepts plain data only (autograder/codec.py)."""
import base64
import io

import numpy as np
import pytest
import torch

from autograder import codec
from llmspace.sparse import CSR


@pytest.mark.parametrize("value", [
    None, True, 3, -2**70, 1.5, float("inf"), "text", [1, [2, 3]], (1, 2), {(0, 1): 2.5, "k": [1]}, {1, 2},
    np.arange(6, dtype=np.int16).reshape(2, 3), np.float32(2.5), np.dtype("float16"), 2 + 3j,
    torch.arange(4, dtype=torch.bfloat16), torch.float16, torch.Size([2, 3]),
])
def test_roundtrip(value):
    back = codec.decode(codec.encode(value))
    if isinstance(value, np.ndarray):
        assert back.dtype == value.dtype and np.array_equal(back, value)
    elif isinstance(value, torch.Tensor):
        assert back.dtype == value.dtype and torch.equal(back, value)
    elif isinstance(value, torch.Size):
        assert back == tuple(value)
    else:
        assert back == value and type(back) is type(value)


def test_llmspace_dataclass_is_rebuilt_through_its_validating_constructor():
    A = CSR.from_dense(np.eye(3))
    back = codec.decode(codec.encode(A))
    assert isinstance(back, CSR) and np.array_equal(back.to_dense(), np.eye(3))
    bad = codec.encode(A)
    bad["fields"]["indptr"] = codec.encode(np.array([0, 5, 1, 3]))
    with pytest.raises(ValueError, match="non-decreasing"):
        codec.decode(bad)


@pytest.mark.parametrize("payload, match", [
    ({"__dataclass__": "subprocess:Popen", "fields": {}}, "not an llmspace dataclass"),
    ({"__dataclass__": "llmspace.sparse:os", "fields": {}}, "not a dataclass"),
    ({"__reduce__": "os.system"}, "unknown tag"),
    ({"__ndarray__": "!!!"}, "bad base64"),
    ({"__npscalar__": ["|O", 1]}, "object"),
    ({"__dict__": [[[1, 2], 3]]}, "unhashable"),
    ({"__float__": "__import__('os')"}, "bad float"),
])
def test_rejects_anything_else(payload, match):
    with pytest.raises(codec.DecodeError, match=match):
        codec.decode(payload)


def test_object_arrays_never_cross():
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(codec.DecodeError, match="bad array"):
        codec.decode({"__ndarray__": base64.b64encode(buf.getvalue()).decode()})
    with pytest.raises(codec.EncodeError):
        codec.encode(np.array([object()], dtype=object))


def test_unknown_types_are_refused_on_the_sandbox_side():
    class Anything:
        def __eq__(self, other):
            return True
    with pytest.raises(codec.EncodeError, match="cannot be transferred"):
        codec.encode(Anything())


def test_exceptions_keep_builtin_types_only():  # the old wire format, without "builtins"
    assert type(codec.decode_exception({"type": "ValueError", "message": "m"})) is ValueError
    err = codec.decode_exception({"type": "LinAlgError", "message": "singular"})
    assert isinstance(err, codec.StudentError) and type(err).__name__ == "LinAlgError"
    assert type(codec.decode_exception({"type": "os.system('x')", "message": ""})).__name__ == "StudentError"


@pytest.mark.parametrize("name, mro, catch, exact", [
    ("HeaderError", ["ValueError", "Exception", "BaseException"], ValueError, False),
    ("JSONDecodeError", ["ValueError", "Exception", "BaseException"], ValueError, False),
    ("UnicodeDecodeError", ["UnicodeDecodeError", "UnicodeError", "ValueError", "Exception", "BaseException"],
     UnicodeError, False),
    ("MissingFile", ["FileNotFoundError", "OSError", "Exception", "BaseException"], OSError, False),
    ("TypeError", ["TypeError", "Exception", "BaseException"], TypeError, True),
    ("KeyError", ["KeyError", "LookupError", "Exception", "BaseException"], KeyError, True),
])
def test_exceptions_keep_isinstance_semantics(name, mro, catch, exact):
    """A subclass of a built-in raised in the sandbox still satisfies ``except <built-in>`` (issue 10)."""
    err = codec.decode_exception({"type": name, "message": "bad header", "builtins": mro})
    assert isinstance(err, catch) and type(err).__name__ == name
    assert (type(err) is catch) == exact
    assert "bad header" in str(err)
    if not exact:
        assert isinstance(err, codec.StudentError)


def test_exceptions_never_rebuild_base_exceptions_or_forged_names():
    err = codec.decode_exception({"type": "KeyboardInterrupt", "message": "", "builtins": ["KeyboardInterrupt",
                                                                                         "BaseException"]})
    assert isinstance(err, codec.StudentError) and not isinstance(err, KeyboardInterrupt)
    err = codec.decode_exception({"type": "x; y", "message": "", "builtins": ["NoSuchError", "ValueError"]})
    assert type(err).__name__ == "StudentError" and isinstance(err, ValueError)
    err = codec.decode_exception({"type": "E", "message": "", "builtins": "ValueError"})  # not a list
    assert type(err).__name__ == "E" and not isinstance(err, ValueError)


def test_exception_mro_crosses_the_real_worker():
    """Through the sandbox worker: a student's ValueError subclass, json's and codecs' errors."""
    from autograder.grading import RemoteFunction
    from autograder.sandbox import Sandbox
    source = (
        "import json\n"
        "class HeaderError(ValueError):\n    pass\n"
        "def parse(kind):\n"
        "    if kind == 'own':\n        raise HeaderError('3 bytes is too short')\n"
        "    if kind == 'json':\n        return json.loads('{')\n"
        "    return b'\\xff'.decode('utf-8')\n")
    with Sandbox() as box:
        assert box.run_cell(source)["ok"]
        parse = RemoteFunction(box, "parse")
        for kind, name in (("own", "HeaderError"), ("json", "JSONDecodeError"), ("utf8", "UnicodeDecodeError")):
            with pytest.raises(ValueError) as info:
                parse(kind)
            assert type(info.value).__name__ == name


def test_keyword_arguments_cross_the_real_worker():
    """A check may pass a keyword (``accumulate_gradients(..., ignore_index=-100)``): it reaches the
    student's function in the sandbox, and a keyword the function lacks is the student's TypeError."""
    from autograder.grading import RemoteFunction
    from autograder.sandbox import Sandbox
    source = ("def f(a, *, ignore_index=None, scale=1):\n"
              "    return [a, ignore_index, scale]\n"
              "def g(a):\n    return a\n")
    with Sandbox() as box:
        assert box.run_cell(source)["ok"]
        f = RemoteFunction(box, "f")
        assert f(1) == [1, None, 1]
        assert f(2, ignore_index=-100, scale=3) == [2, -100, 3]
        with pytest.raises(TypeError, match="ignore_index"):
            RemoteFunction(box, "g")(1, ignore_index=-100)
