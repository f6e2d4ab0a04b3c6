"""Interesting safetensors inputs, kept as test cases: each is ``(name, header_text, data)``; the file is
``len(header).to_bytes(8, "little") + header + data``. Found by probing ``safetensors`` 0.8's parser and
by the fuzz tests (tests/test_storage_faults.py, benchmarks/storage_fuzz.py). The expected outcome is
not stored: the tests ask the ``safetensors`` library each time (both accept or both reject), except for
the duplicate keys in :data:`STRICTER`, which we refuse and the reference tolerates."""

U8 = '"dtype":"U8","shape":[2],"data_offsets":[0,2]'


def t(extra: str = "", name: str = "t") -> str:
    return '{"' + name + '":{' + U8 + extra + "}}"


CORPUS = [
    ("plain", t(), b"ab"),
    ("unknown field ignored", t(',"x":1'), b"ab"),
    ("unknown field nested 125 deep", t(',"x":' + "[" * 125 + "]" * 125), b"ab"),
    ("unknown field nested 126 deep", t(',"x":' + "[" * 126 + "]" * 126), b"ab"),
    ("objects nested 126 deep", t(',"x":' + '{"a":' * 126 + "1" + "}" * 126), b"ab"),
    ("nested 100000 deep", t(',"x":' + "[" * 100000 + "]" * 100000), b"ab"),
    ("duplicate field", '{"t":{' + U8 + ',"shape":[2]}}', b"ab"),
    ("metadata null", '{"__metadata__":null,"t":{' + U8 + "}}", b"ab"),
    ("metadata value not a string", '{"__metadata__":{"a":1},"t":{' + U8 + "}}", b"ab"),
    ("metadata nested", '{"__metadata__":{"a":{"b":"c"}}}', b""),
    ("shape [2**64, 0]", '{"t":{"dtype":"U8","shape":[18446744073709551616,0],"data_offsets":[0,0]}}', b""),
    ("shape [2**64-1, 0]", '{"t":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', b""),
    ("shape overflow midway", '{"t":{"dtype":"U8","shape":[9223372036854775808,2,0],"data_offsets":[0,0]}}', b""),
    ("dimension 2**63 beside a zero", '{"t":{"dtype":"BF16","shape":[0,9223372036854775808],"data_offsets":[0,0]}}', b""),
    ("shape zero first", '{"t":{"dtype":"U8","shape":[0,9223372036854775808,2],"data_offsets":[0,0]}}', b""),
    ("bits overflow", '{"t":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}}', b""),
    ("U8 2**61 elements", '{"t":{"dtype":"U8","shape":[2305843009213693952],"data_offsets":[0,0]}}', b""),
    ("negative dimension", '{"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}', b"a"),
    ("-0 dimension", '{"t":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}', b""),
    ("float dimension", '{"t":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', b"ab"),
    ("exponent dimension", '{"t":{"dtype":"U8","shape":[1e2],"data_offsets":[0,100]}}', b"a" * 100),
    ("bool dimension", '{"t":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}', b"a"),
    ("NaN literal", t(',"x":NaN'), b"ab"),
    ("Infinity literal", t(',"x":-Infinity'), b"ab"),
    ("float out of range", t(',"x":1e400'), b"ab"),
    ("float underflow", t(',"x":1e-400'), b"ab"),
    ("30-digit integer", t(',"x":' + "9" * 30), b"ab"),
    ("5000-digit integer", t(',"x":' + "9" * 5000), b"ab"),
    ("negative integer field", t(',"x":-5'), b"ab"),
    ("lone surrogate in name", '{"\\ud800":{' + U8 + "}}", b"ab"),
    ("lone surrogate in ignored field", t(',"x":"\\udc00"'), b"ab"),
    ("surrogate pair", '{"\\ud83d\\ude00":{' + U8 + "}}", b"ab"),
    ("control character in name", '{"t\x01":{' + U8 + "}}", b"ab"),
    ("DEL in name", '{"t\x7f":{' + U8 + "}}", b"ab"),
    ("empty name", '{"":{' + U8 + "}}", b"ab"),
    ("escaped dtype", '{"t":{"dtype":"\\u00558","shape":[2],"data_offsets":[0,2]}}', b"ab"),
    ("leading whitespace", " " + t(), b"ab"),
    ("trailing whitespace", t() + "\n\t ", b"ab"),
    ("trailing NUL", t() + "\x00", b"ab"),
    ("trailing no-break space", t() + "\u00a0", b"ab"),
    ("byte order mark", "\ufeff" + t(), b"ab"),
    ("empty header", "", b""),
    ("empty object", "{}", b""),
    ("empty object with data", "{}", b"a"),
    ("header is a list", "[]", b""),
    ("top-level non-object entry", '{"t":{' + U8 + '},"x":5}', b"ab"),
    ("offsets reversed", '{"t":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}}', b"ab"),
    ("offsets 2**64", '{"t":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551616,18446744073709551616]}}', b""),
    ("three offsets", '{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2,3]}}', b"ab"),
    ("gap before tensor", '{"t":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"ab"),
    ("overlap", '{"t":{' + U8 + '},"u":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"ab"),
    ("out of order", '{"u":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"ab"),
    ("two empty tensors at one offset", '{"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"u":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}', b""),
    ("dtype lower case", '{"t":{"dtype":"u8","shape":[2],"data_offsets":[0,2]}}', b"ab"),
    ("dtype not a string", '{"t":{"dtype":8,"shape":[2],"data_offsets":[0,2]}}', b"ab"),
    ("F4 odd count", '{"t":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}', b"a"),
    ("F4 3x2", '{"t":{"dtype":"F4","shape":[3,2],"data_offsets":[0,3]}}', b"abc"),
    ("F6 four values", '{"t":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}', b"abc"),
    ("F6 two values", '{"t":{"dtype":"F6_E3M2","shape":[2],"data_offsets":[0,2]}}', b"ab"),
    ("F8_E8M0", '{"t":{"dtype":"F8_E8M0","shape":[2],"data_offsets":[0,2]}}', b"ab"),
    ("C64 scalar", '{"t":{"dtype":"C64","shape":[],"data_offsets":[0,8]}}', b"abcdefgh"),
    ("U64 misaligned start", '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"t":{"dtype":"U64","shape":[1],"data_offsets":[1,9]}}', b"abcdefghi"),
    ("metadata tensor-like", '{"__metadata__":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"ab"),
]

# We refuse these; safetensors keeps the last of the duplicated keys (a name that means two things).
STRICTER = [
    ("duplicate tensor name", '{"t":{' + U8 + '},"t":{' + U8 + "}}", b"ab"),
    ("duplicate metadata key", '{"__metadata__":{"a":"1","a":"2"}}', b""),
    ("duplicate key in ignored field", t(',"x":{"a":1,"a":2}'), b"ab"),
]


def file_bytes(header: str, data: bytes) -> bytes:
    raw = header.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(8, "little") + raw + data
