"""The JSON codec reads and writes with orjson where it can and with the standard library where
orjson refuses: whichever does the work, the result is the standard library's (the codec's
contract before orjson), except that integers beyond 64 bits may be read as floats, which is
what Lua makes of them anyway."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from luaq.runtime.codecs import CODECS, INT64
from luaq.runtime.errors import QueueError

JSON = CODECS["json/plain"]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text()
    | st.sampled_from(["\ud800", "a\udfffb"])  # lone surrogates: no UTF-8 form
)
DATA = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


def standard(data: Any) -> bytes | None:
    """What the standard library writes, None where it refuses."""
    try:
        return json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError):
        return None


def as_lua_reads(data: Any) -> Any:
    """Integers beyond 64 bits as floats, as Lua holds them."""
    if isinstance(data, dict):
        return {key: as_lua_reads(value) for key, value in data.items()}
    if isinstance(data, list):
        return [as_lua_reads(value) for value in data]
    if type(data) is int and data not in INT64:
        return float(data)
    return data


@given(DATA)
@example({"x": [math.nan]})
@example({"x": -math.inf, "y": None})
@example(2**64)
@example({"a": "\ud800"})
def test_writes_what_the_standard_library_writes_and_refuses_what_it_refuses(data: Any) -> None:
    expected = standard(data)
    if expected is None:
        with pytest.raises(QueueError, match="cannot be encoded as JSON"):
            JSON.encode(data)
    else:
        assert json.loads(JSON.encode(data)) == json.loads(expected)


@given(DATA)
@example([2**63, 2**64, -(2**63) - 1])
def test_reads_what_the_standard_library_reads(data: Any) -> None:
    body = standard(data)
    if body is not None:
        assert as_lua_reads(JSON.decode(body)) == as_lua_reads(json.loads(body))


@pytest.mark.parametrize(
    "body",
    [
        b'{"x": NaN, "y": -Infinity}',  # Python's json.dumps writes these by default
        b'\xef\xbb\xbf{"x": NaN, "y": -Infinity}',
        '{"x": NaN, "y": -Infinity}'.encode("utf-16"),
    ],
)
def test_reads_the_numbers_python_clients_write(body: bytes) -> None:
    data = JSON.decode(body)
    assert math.isnan(data["x"])
    assert data["y"] == -math.inf


@pytest.mark.parametrize(
    "body", [b'{"a": "\\ud800"}', b'\xef\xbb\xbf{"a": "\\ud800"}', b'{"\\udc00": 1}', b'"\\ud800"']
)
def test_a_lone_surrogate_is_no_text(body: bytes) -> None:
    """Python's json reads it into a string that has no UTF-8 form; orjson refuses it."""
    with pytest.raises(ValueError, match="not valid Unicode"):
        JSON.decode(body)
