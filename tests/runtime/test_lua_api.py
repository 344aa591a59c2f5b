"""The Lua API (docs/lua-api.md), exercised through Lua code.

Handlers publish what they observe to `out` and the tests assert on what arrives there; nothing
is mocked: real entries files, the real Lua runtime and the real memory driver.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from conftest import AppFactory

KINDS = [
    "INVALID",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "UNAVAILABLE",
    "INTERNAL",
    "CANCELED",
    "CONFLICT",
    "TIMEOUT",
    "RATE_LIMITED",
    "UNKNOWN",
]

# Lua helpers shared by the handlers below: `outcome(pcall(f))` describes what a call returned
# (or raised) as plain data, naming an error's kind by the `errors` constant it equals, so the
# tests never depend on the constants' string values.
PRELUDE = r"""
local KIND_NAMES = {}
for _, name in ipairs({"INVALID", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
    "UNAVAILABLE", "INTERNAL", "CANCELED", "CONFLICT", "TIMEOUT", "RATE_LIMITED", "UNKNOWN"}) do
  if errors[name] ~= nil then KIND_NAMES[errors[name]] = name end
end

local function kind_name(err)
  local kind = err:kind()
  return KIND_NAMES[kind] or ("not a constant: " .. tostring(kind))
end

local function outcome(called, value, err)
  if not called then return {raised = tostring(value)} end
  local r = {value = tostring(value), value_type = type(value)}
  if err ~= nil then
    r.kind = kind_name(err)
    r.retryable = err:retryable()
    r.message = err:message()
    r.text = tostring(err)
  end
  return r
end
"""


def typed(value: Any) -> Any:
    """`value` with every scalar tagged by its type: 1 == 1.0 == True in Python, not here."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, value)


def assert_error(report: dict[str, Any], kind: str, retryable: bool) -> None:
    """A call that returned `nil, err` with an error of `kind`, describable with tostring."""
    assert "raised" not in report, report
    assert report["value_type"] == "nil", report
    assert report["kind"] == kind, report
    assert report["retryable"] is retryable, report
    assert isinstance(report["message"], str), report
    assert report["message"], report
    assert isinstance(report["text"], str), report
    assert report["message"] in report["text"], report


# -- queue.publish: return value and data ---------------------------------------------------------


async def test_publish_returns_exactly_true(apps: AppFactory) -> None:
    _, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          local result = table.pack(queue.publish("other", {a = 1}))
          queue.publish("out", {
            first = result[1], first_type = type(result[1]), second_is_nil = result[2] == nil,
          })
        end
        """,
        ["go"],
    )
    assert [m.data for m in out] == [
        {"first": True, "first_type": "boolean", "second_is_nil": True}
    ]


async def test_publish_scalars_and_tables_from_lua(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local values = {
            "text", 42, -7, 0, 4.5, 1.0, 7 // 2, 7 / 2, true, false, math.maxinteger,
            "héllo ✓ 日本", {}, {1, 2, 3}, {a = {b = {c = {1, {x = true}, "z"}}}},
            {["héllo"] = "✓"},
          }
          local returned = {}
          for i = 1, #values do returned[i] = queue.publish("out", values[i]) end
          queue.publish("other", {returned = returned})
        end
        """,
        ["go"],
    )
    expected = [
        "text",
        42,
        -7,
        0,
        4.5,
        1.0,
        3,
        3.5,
        True,
        False,
        2**63 - 1,
        "héllo ✓ 日本",
        {},
        [1, 2, 3],
        {"a": {"b": {"c": [1, {"x": True}, "z"]}}},
        {"héllo": "✓"},
    ]
    assert typed([m.data for m in out]) == typed(expected)
    report = await app.drain("other")
    assert typed(report[0].data) == typed({"returned": [True] * len(expected)})


@pytest.mark.parametrize(
    "payload",
    [
        {"user": {"id": 7, "tags": ["a", "b"], "meta": {"deep": {"er": [1, [2, [3]]]}}}},
        [1, 2.5, "x", True, False],
        [],
        {"empty": [], "obj": {}, "matrix": [[1, 2], [], [3]], "objs": [{}, {"k": []}]},
        {"i": 1, "f": 1.0, "neg": -3, "big": 2**53 + 1, "small": 1e-9, "zero": 0.0},
        "héllo ✓ 日本",
        {"héllo": "✓ 日本", "emoji": "🎉"},
        42,
        1.0,
        -0.5,
        True,
        False,
    ],
    ids=[
        "nested",
        "array",
        "empty-array",
        "empty-containers",
        "numbers",
        "unicode-string",
        "unicode-keys",
        "integer",
        "float-one",
        "float",
        "true",
        "false",
    ],
)
async def test_payload_republished_unchanged(apps: AppFactory, payload: Any) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local ok, err = queue.publish("out", p)
          assert(ok, err)
        end
        """,
        [payload],
    )
    assert typed([m.data for m in out]) == typed([payload])
    assert app.consumer.stats.acked == 1


async def test_payload_types_as_lua_sees_them(apps: AppFactory) -> None:
    _, out = await apps.run(
        """
        function handle(p)
          queue.publish("out", {
            i = math.type(p.i), f = math.type(p.f), f_value = p.f,
            s_type = type(p.s), s_chars = utf8.len(p.s), s_bytes = #p.s,
            list_len = #p.list, list_first = p.list[1], list_last = p.list[3],
            empty_type = type(p.empty), empty_len = #p.empty, obj_k = p.obj.k,
            flag = type(p.flag), nested = p.obj.inner.deep[2],
          })
          queue.publish("out", p.empty)
          queue.publish("out", {wrapped = p.empty, list = p.list})
        end
        """,
        [
            {
                "i": 1,
                "f": 1.0,
                "s": "héllo ✓ 日本",
                "list": [10, 20, 30],
                "empty": [],
                "obj": {"k": "v", "inner": {"deep": ["a", "b"]}},
                "flag": True,
            }
        ],
    )
    assert typed([m.data for m in out]) == typed(
        [
            {
                "i": "integer",
                "f": "float",
                "f_value": 1.0,
                "s_type": "string",
                "s_chars": 10,
                "s_bytes": len("héllo ✓ 日本".encode()),
                "list_len": 3,
                "list_first": 10,
                "list_last": 30,
                "empty_type": "table",
                "empty_len": 0,
                "obj_k": "v",
                "flag": "boolean",
                "nested": "b",
            },
            [],
            {"wrapped": [], "list": [10, 20, 30]},
        ]
    )


async def test_publish_headers_round_trip(apps: AppFactory) -> None:
    _, out = await apps.run(
        """
        function handle(p)
          local headers = {s = "x", n = 5, f = 1.5, yes = true, no = false, u = "日本"}
          queue.publish("out", "with", headers)
          queue.publish("out", "without")
          queue.publish("out", "empty table", {})
        end
        """,
        ["go"],
    )
    assert [m.data for m in out] == ["with", "without", "empty table"]
    assert typed(out[0].headers) == typed(
        {"s": "x", "n": 5, "f": 1.5, "yes": True, "no": False, "u": "日本"}
    )
    assert out[1].headers == {}
    assert out[2].headers == {}


async def test_bare_queue_name_resolves_in_namespace(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          assert(queue.publish("out", "bare"))
          assert(queue.publish("app:out", "qualified"))
          assert(queue.publish("app:other", "qualified other"))
        end
        """,
        ["go"],
    )
    assert [m.data for m in out] == ["bare", "qualified"]
    assert [m.data for m in await app.drain("other")] == ["qualified other"]


# -- the publish errors table ----------------------------------------------------------------------


async def test_publish_errors(apps: AppFactory) -> None:
    _, out = await apps.run(
        PRELUDE
        + """
        local cyclic = {}
        cyclic.self = cyclic
        local cases = {
          empty_id = function() return queue.publish("", {a = 1}) end,
          nil_id = function() return queue.publish(nil, {a = 1}) end,
          nil_data = function() return queue.publish("out", nil) end,
          empty_data = function() return queue.publish("out", "") end,
          undeclared = function() return queue.publish("missing", {a = 1}) end,
          other_namespace = function() return queue.publish("elsewhere:out", {a = 1}) end,
          headers_string = function() return queue.publish("out", {a = 1}, "priority=high") end,
          headers_number = function() return queue.publish("out", {a = 1}, 5) end,
          headers_integer_key = function() return queue.publish("out", {a = 1}, {"x"}) end,
          headers_table_key = function() return queue.publish("out", {a = 1}, {[{}] = "x"}) end,
          headers_table_value = function()
            return queue.publish("out", {a = 1}, {nested = {x = 1}})
          end,
          headers_function_value = function()
            return queue.publish("out", {a = 1}, {f = function() end})
          end,
          data_function = function() return queue.publish("out", function() end) end,
          data_nested_function = function()
            return queue.publish("out", {list = {1, function() end}})
          end,
          data_cyclic = function() return queue.publish("out", cyclic) end,
          data_boolean_key = function() return queue.publish("out", {[true] = 1}) end,
          data_nan = function() return queue.publish("out", {x = 0/0}) end,
        }
        function handle(p)
          local report = {}
          for name, case in pairs(cases) do report[name] = outcome(pcall(case)) end
          queue.publish("out", report)
        end
        """,
        ["go"],
    )
    assert len(out) == 1, [m.data for m in out]  # none of the bad publishes got through
    report = out[0].data
    not_found = {"undeclared", "other_namespace"}
    assert len(report) == 17
    for name, case in report.items():
        assert_error(case, "NOT_FOUND" if name in not_found else "INVALID", retryable=False)


async def test_publish_to_full_queue_is_internal_and_retryable(apps: AppFactory) -> None:
    app, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          local first = outcome(pcall(queue.publish, "other", 1))
          local second = outcome(pcall(queue.publish, "other", 2))
          queue.publish("out", {first = first, second = second})
        end
        """,
        ["go"],
        max_length=1,
    )
    report = out[0].data
    assert report["first"] == {"value": "true", "value_type": "boolean"}
    assert_error(report["second"], "INTERNAL", retryable=True)
    assert [m.data for m in await app.drain("other")] == [1]


async def test_queue_message_outside_a_consumer_is_invalid(apps: AppFactory) -> None:
    _, out = await apps.run(
        PRELUDE
        + """
        local at_load = outcome(pcall(queue.message))
        function handle(p)
          queue.publish("out", at_load)
        end
        """,
        ["go"],
    )
    assert_error(out[0].data, "INVALID", retryable=False)


# -- Message methods ------------------------------------------------------------------------------


async def test_message_id_is_the_delivery_id_and_survives_redelivery(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="luaq.consumer")
    app, out = await apps.run(
        """
        local attempts = {}
        function handle(p)
          local id = queue.message():id()
          attempts[id] = (attempts[id] or 0) + 1
          local n = attempts[id]
          queue.publish("out", {name = p, id = id, id_type = type(id), attempt = n})
          if p == "retried" and n == 1 then return false end
          if p == "retried" and n == 2 then
            return nil, errors.new({message = "second attempt fails", kind = errors.UNAVAILABLE})
          end
        end
        """,
        ["retried", "plain"],
    )
    seen = [m.data for m in out]
    retried = [m for m in seen if m["name"] == "retried"]
    plain = [m for m in seen if m["name"] == "plain"]
    assert [m["attempt"] for m in retried] == [1, 2, 3]
    assert [m["attempt"] for m in plain] == [1]
    ids = {m["id"] for m in retried}
    assert len(ids) == 1
    (retried_id,) = ids
    assert isinstance(retried_id, str)
    assert retried_id
    assert all(m["id_type"] == "string" for m in seen)
    assert plain[0]["id"] != retried_id
    # the consumer logs the failed delivery with its id: the same id the handler saw
    failures = [r for r in caplog.records if r.getMessage() == "handler failed"]
    assert [getattr(r, "message_id", None) for r in failures] == [retried_id]
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (4, 2, 2, 1)


async def test_message_header_and_headers(apps: AppFactory) -> None:
    headers = {"s": "x", "n": 5, "f": 1.5, "yes": True, "no": False, "u": "日本"}
    _, out = await apps.run(
        """
        function handle(p)
          local msg = queue.message()
          if p == "bare" then
            local all = msg:headers()
            queue.publish("out", {
              type = type(all), empty = next(all) == nil, missing = msg:header("s") == nil,
            })
            return
          end
          local types = {}
          for k, v in pairs(msg:headers()) do types[k] = math.type(v) or type(v) end
          local copy = msg:headers()
          copy.s = "changed"
          copy.added = "new"
          copy.n = nil
          local again = msg:headers()
          queue.publish("out", {
            s = msg:header("s"), n = msg:header("n"), f = msg:header("f"),
            yes = msg:header("yes"), no = msg:header("no"), u = msg:header("u"),
            missing_is_nil = msg:header("missing") == nil,
            types = types,
            again_s = again.s, again_n = again.n, again_has_added = again.added ~= nil,
            header_s = msg:header("s"), header_added_is_nil = msg:header("added") == nil,
          }, again)
        end
        """,
        [("full", headers), "bare"],
    )
    full, bare = (m.data for m in out)
    assert typed(full) == typed(
        {
            **headers,
            "missing_is_nil": True,
            "types": {
                "s": "string",
                "n": "integer",
                "f": "float",
                "yes": "boolean",
                "no": "boolean",
                "u": "string",
            },
            "again_s": "x",
            "again_n": 5,
            "again_has_added": False,
            "header_s": "x",
            "header_added_is_nil": True,
        }
    )
    assert typed(out[0].headers) == typed(headers)
    assert bare == {"type": "table", "empty": True, "missing": True}


# -- queue.info -----------------------------------------------------------------------------------


async def test_queue_info_counts(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local before = queue.info("other")
          for i = 1, 3 do assert(queue.publish("other", i)) end
          queue.publish("out", {
            before = before, other = queue.info("other"), qualified = queue.info("app:other"),
            input = queue.info("in"), out = queue.info("out"),
          })
        end
        """,
        ["go"],
    )
    assert typed(out[0].data) == typed(
        {
            "before": {"message_count": 0, "consumer_count": 0},
            "other": {"message_count": 3, "consumer_count": 0},
            "qualified": {"message_count": 3, "consumer_count": 0},
            "input": {"message_count": 0, "consumer_count": 1},
            "out": {"message_count": 0, "consumer_count": 0},
        }
    )
    assert await app.info("other") == (3, 0)


async def test_queue_info_errors(apps: AppFactory) -> None:
    _, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          queue.publish("out", {
            empty = outcome(pcall(queue.info, "")),
            nil_id = outcome(pcall(queue.info, nil)),
            undeclared = outcome(pcall(queue.info, "missing")),
            other_namespace = outcome(pcall(queue.info, "elsewhere:other")),
          })
        end
        """,
        ["go"],
    )
    report = out[0].data
    assert_error(report["empty"], "INVALID", retryable=False)
    assert_error(report["nil_id"], "INVALID", retryable=False)
    assert_error(report["undeclared"], "NOT_FOUND", retryable=False)
    assert_error(report["other_namespace"], "NOT_FOUND", retryable=False)


# -- errors ---------------------------------------------------------------------------------------


async def test_errors_module(apps: AppFactory) -> None:
    _, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          local plain = errors.new("text")
          local full = errors.new({
            message = "boom", kind = errors.NOT_FOUND, retryable = true,
            details = {id = 7, tags = {"a", "b"}},
          })
          local wrapped = errors.wrap(full, "loading user")
          local wrapped_plain = errors.wrap(plain, "context")
          local defaults = errors.new({message = "m", kind = errors.CONFLICT})
          queue.publish("out", {
            plain = {
              message = plain:message(), text = tostring(plain), retryable = plain:retryable(),
              kind_type = type(plain:kind()), details_is_nil = plain:details() == nil,
            },
            full = {
              message = full:message(), text = tostring(full), kind = kind_name(full),
              retryable = full:retryable(), details = full:details(),
            },
            wrapped = {
              message = wrapped:message(), text = tostring(wrapped), kind = kind_name(wrapped),
              retryable = wrapped:retryable(),
              is_not_found = errors.is(wrapped, errors.NOT_FOUND),
              is_invalid = errors.is(wrapped, errors.INVALID) == true,
            },
            wrapped_plain = {
              message = wrapped_plain:message(), same_kind = wrapped_plain:kind() == plain:kind(),
            },
            defaults = {retryable = defaults:retryable(), kind = kind_name(defaults)},
            is = {
              match = errors.is(full, errors.NOT_FOUND),
              other_kind = errors.is(full, errors.INVALID) == true,
              string = errors.is("boom", errors.NOT_FOUND) == true,
              ["nil"] = errors.is(nil, errors.NOT_FOUND) == true,
              table = errors.is({kind = errors.NOT_FOUND}, errors.NOT_FOUND) == true,
            },
          })
        end
        """,
        ["go"],
    )
    report = out[0].data
    assert report["plain"] == {
        "message": "text",
        "text": report["plain"]["text"],
        "retryable": False,
        "kind_type": "string",
        "details_is_nil": True,
    }
    assert "text" in report["plain"]["text"]
    assert typed(report["full"]) == typed(
        {
            "message": "boom",
            "text": report["full"]["text"],
            "kind": "NOT_FOUND",
            "retryable": True,
            "details": {"id": 7, "tags": ["a", "b"]},
        }
    )
    assert "boom" in report["full"]["text"]
    wrapped = report["wrapped"]
    assert wrapped["message"].startswith("loading user")
    assert wrapped["message"].endswith("boom")
    assert "loading user" in wrapped["text"]
    assert "boom" in wrapped["text"]
    assert wrapped["kind"] == "NOT_FOUND"
    assert wrapped["retryable"] is True
    assert wrapped["is_not_found"] is True
    assert wrapped["is_invalid"] is False
    assert report["wrapped_plain"]["message"].startswith("context")
    assert report["wrapped_plain"]["message"].endswith("text")
    assert report["wrapped_plain"]["same_kind"] is True
    assert report["defaults"] == {"retryable": False, "kind": "CONFLICT"}
    assert report["is"] == {
        "match": True,
        "other_kind": False,
        "string": False,
        "nil": False,
        "table": False,
    }


async def test_errors_kind_constants(apps: AppFactory) -> None:
    names = ", ".join(f'"{name}"' for name in KINDS)
    _, out = await apps.run(
        f"""
        function handle(p)
          local found = {{}}
          for _, name in ipairs({{{names}}}) do
            local e = errors.new({{message = name, kind = errors[name]}})
            found[name] = {{
              value_type = type(errors[name]), round_trip = e:kind() == errors[name],
              is = errors.is(e, errors[name]),
            }}
          end
          queue.publish("out", found)
        end
        """,
        ["go"],
    )
    found = out[0].data
    assert found == {
        name: {"value_type": "string", "round_trip": True, "is": True} for name in KINDS
    }


async def test_errors_kind_constants_are_distinct(apps: AppFactory) -> None:
    names = ", ".join(f'"{name}"' for name in KINDS)
    _, out = await apps.run(
        f"""
        function handle(p)
          local values = {{}}
          for _, name in ipairs({{{names}}}) do values[name] = errors[name] end
          queue.publish("out", values)
        end
        """,
        ["go"],
    )
    values = out[0].data
    assert sorted(values) == sorted(KINDS)
    assert len(set(values.values())) == len(KINDS)


async def test_returned_error_kinds_reach_the_consumer(apps: AppFactory) -> None:
    app, _ = await apps.run(
        """
        local attempts = {}
        function handle(p)
          attempts[p] = (attempts[p] or 0) + 1
          if attempts[p] == 1 then return nil, errors.new({message = p, kind = errors[p]}) end
        end
        """,
        KINDS,
    )
    stats = app.consumer.stats
    assert stats.errors == dict.fromkeys(KINDS, 1)
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (22, 11, 11, 11)


# -- json -----------------------------------------------------------------------------------------


async def test_json_round_trip(apps: AppFactory) -> None:
    _, out = await apps.run(
        """
        function handle(p)
          local value = {
            name = "héllo ✓ 日本", n = 3, f = 1.5, one = 1.0, list = {1, 2, 3},
            empty = p.empty, nested = {a = {b = true}},
          }
          local text = json.encode(value)
          local back = json.decode(text)
          queue.publish("out", {
            text = text, back = back,
            one = math.type(back.one), n = math.type(back.n),
            array = json.encode({1, 2, 3}), object = json.encode({a = 1}),
            string = json.encode("x"), number = json.encode(2), boolean = json.encode(false),
            empty_array = json.encode(p.empty),
            decoded = json.decode('{"x": [1, 2.0, "three", false], "y": {}, "z": []}'),
            decoded_scalar = json.decode("12"),
          })
        end
        """,
        [{"empty": []}],
    )
    report = out[0].data
    value = {
        "name": "héllo ✓ 日本",
        "n": 3,
        "f": 1.5,
        "one": 1.0,
        "list": [1, 2, 3],
        "empty": [],
        "nested": {"a": {"b": True}},
    }
    assert typed(json.loads(report["text"])) == typed(value)
    assert typed(report["back"]) == typed(value)
    assert report["one"] == "float"
    assert report["n"] == "integer"
    assert report["array"] == "[1,2,3]"
    assert report["object"] == '{"a":1}'
    assert report["string"] == '"x"'
    assert report["number"] == "2"
    assert report["boolean"] == "false"
    assert report["empty_array"] == "[]"
    assert typed(report["decoded"]) == typed({"x": [1, 2.0, "three", False], "y": {}, "z": []})
    assert typed(report["decoded_scalar"]) == typed(12)


async def test_json_errors(apps: AppFactory) -> None:
    _, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          local cyclic = {}
          cyclic.self = cyclic
          queue.publish("out", {
            truncated = outcome(pcall(json.decode, '{"a": ')),
            garbage = outcome(pcall(json.decode, "not json")),
            empty = outcome(pcall(json.decode, "")),
            not_a_string = outcome(pcall(json.decode, 42)),
            encode_function = outcome(pcall(json.encode, function() end)),
            encode_cyclic = outcome(pcall(json.encode, cyclic)),
            encode_nan = outcome(pcall(json.encode, 0/0)),
            decode_deep = outcome(pcall(json.decode, ("["):rep(101) .. ("]"):rep(101))),
          })
        end
        """,
        ["go"],
    )
    report = out[0].data
    assert sorted(report) == sorted(
        [
            "truncated",
            "garbage",
            "empty",
            "not_a_string",
            "encode_function",
            "encode_cyclic",
            "encode_nan",
            "decode_deep",
        ]
    )
    for case in report.values():
        assert_error(case, "INVALID", retryable=False)


async def test_json_encode_of_a_non_utf8_string_is_an_error_not_a_raise(apps: AppFactory) -> None:
    _, out = await apps.run(
        PRELUDE
        + r"""
        function handle(p)
          queue.publish("out", {
            string = outcome(pcall(json.encode, "\xff\xfe")),
            nested = outcome(pcall(json.encode, {s = "\xff\xfe"})),
          })
        end
        """,
        ["go"],
    )
    report = out[0].data
    assert_error(report["string"], "INVALID", retryable=False)
    assert_error(report["nested"], "INVALID", retryable=False)


# -- logger ---------------------------------------------------------------------------------------


async def test_logger_records_carry_consumer_message_id_and_fields(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="luaq.lua")
    _, out = await apps.run(
        """
        function handle(p)
          logger:debug("debug line", {n = 1})
          logger:info("info line", {user = "ann", tags = {"a", "b"}, f = 1.5})
          logger:warn("warn line", {ok = false})
          logger:error("error line", {code = 42, nested = {k = "v"}})
          logger:info("no fields")
          queue.publish("out", queue.message():id())
        end
        """,
        ["go"],
    )
    message_id = out[0].data
    records = {r.getMessage(): r for r in caplog.records if r.name == "luaq.lua"}
    assert set(records) == {"debug line", "info line", "warn line", "error line", "no fields"}
    levels = {message: record.levelno for message, record in records.items()}
    assert levels == {
        "debug line": logging.DEBUG,
        "info line": logging.INFO,
        "warn line": logging.WARNING,
        "error line": logging.ERROR,
        "no fields": logging.INFO,
    }
    for record in records.values():
        assert getattr(record, "consumer", None) == "app:worker"
        assert getattr(record, "message_id", None) == message_id
    fields = {message: getattr(record, "fields", None) for message, record in records.items()}
    assert typed(fields) == typed(
        {
            "debug line": {"n": 1},
            "info line": {"user": "ann", "tags": ["a", "b"], "f": 1.5},
            "warn line": {"ok": False},
            "error line": {"code": 42, "nested": {"k": "v"}},
            "no fields": None,
        }
    )


# -- require and modules --------------------------------------------------------------------------


REQUIRE_REPORT = PRELUDE + (
    """
    local function available(name)
      local ok, module = pcall(require, name)
      if ok then return type(module) end
      return "error: " .. tostring(module)
    end
    function handle(p)
      queue.publish("out", {
        queue = available("queue"), logger = available("logger"), json = available("json"),
        time = available("time"), nope = available("nope"),
        same_queue = require("queue") == queue,
        global_logger = type(logger), global_json = type(json), global_time = type(time),
        errors = type(errors), errors_new = type(errors.new),
      })
    end
    """
)


async def test_require_default_modules(apps: AppFactory) -> None:
    _, out = await apps.run(REQUIRE_REPORT, ["go"])
    report = out[0].data
    assert report["queue"] == report["logger"] == report["json"] == "table"
    assert report["time"].startswith("error: ")
    assert report["nope"].startswith("error: ")
    assert report["same_queue"] is True
    assert (report["global_logger"], report["global_json"]) == ("table", "table")
    assert report["global_time"] == "nil"
    assert (report["errors"], report["errors_new"]) == ("table", "function")


async def test_require_only_listed_modules(apps: AppFactory) -> None:
    _, out = await apps.run(REQUIRE_REPORT, ["go"], modules=["queue"])
    report = out[0].data
    assert report["queue"] == "table"
    assert report["same_queue"] is True
    for name in ("logger", "json", "time", "nope"):
        assert report[name].startswith("error: "), (name, report[name])
    assert (report["global_logger"], report["global_json"], report["global_time"]) == (
        "nil",
        "nil",
        "nil",
    )
    assert (report["errors"], report["errors_new"]) == ("table", "function")


async def test_require_time_when_listed(apps: AppFactory) -> None:
    _, out = await apps.run(REQUIRE_REPORT, ["go"], modules=["queue", "time"])
    report = out[0].data
    assert (report["queue"], report["time"], report["global_time"]) == ("table", "table", "table")
    assert report["json"].startswith("error: ")


# -- loading --------------------------------------------------------------------------------------


async def test_top_level_runs_once_and_module_state_persists(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="luaq.lua")
    source = """
        local loads = 0
        local calls = 0
        loads = loads + 1
        logger:info("module loaded")
        function handle(p)
          calls = calls + 1
          queue.publish("out", {loads = loads, calls = calls, payload = p})
        end
        """

    def loaded() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "module loaded"]

    app = await apps.start(source)
    # the chunk ran at start-up, before any delivery, outside any consumer
    assert len(loaded()) == 1
    assert getattr(loaded()[0], "message_id", None) is None
    for n in range(3):
        await app.publish("in", n)
    await app.idle()
    out = await app.drain("out")
    assert [m.data for m in out] == [
        {"loads": 1, "calls": 1, "payload": 0},
        {"loads": 1, "calls": 2, "payload": 1},
        {"loads": 1, "calls": 3, "payload": 2},
    ]
    assert len(loaded()) == 1


# -- time.sleep -----------------------------------------------------------------------------------


async def test_time_sleep_yields_and_resumes(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local before = queue.message():id()
          local started = time.now()
          local ok, err = time.sleep(p.sleep)
          queue.publish("out", {
            name = p.name, ok = ok, err_is_nil = err == nil,
            same_message = queue.message():id() == before,
            elapsed = time.now() - started,
          })
        end
        """,
        [{"name": "slow", "sleep": 0.2}, {"name": "fast", "sleep": 0}],
        modules=["queue", "logger", "json", "time"],
        concurrency=2,
    )
    # the slow handler yielded while it slept, so the fast one (delivered later) finished first
    assert [m.data["name"] for m in out] == ["fast", "slow"]
    for m in out:
        assert (m.data["ok"], m.data["err_is_nil"], m.data["same_message"]) == (True, True, True)
    assert out[1].data["elapsed"] >= 0.19
    assert app.consumer.stats.acked == 2


# -- data that cannot cross to Python -------------------------------------------------------------


async def test_publish_of_non_utf8_strings_is_invalid(apps: AppFactory) -> None:
    """Bytes that are not UTF-8 cannot become JSON text: INVALID, like a function.

    Only the first attempt tries it, so a crash that redelivers cannot loop forever.
    """
    app, out = await apps.run(
        PRELUDE
        + r"""
        local attempts = 0
        function handle(p)
          attempts = attempts + 1
          if attempts > 1 then
            queue.publish("out", {redelivered = attempts})
            return
          end
          queue.publish("out", {
            data = outcome(pcall(queue.publish, "other", "\xff\xfe")),
            nested = outcome(pcall(queue.publish, "other", {s = "\xff"})),
            header = outcome(pcall(queue.publish, "other", "x", {h = "\xff"})),
          })
        end
        """,
        ["go"],
    )
    # {"redelivered": 2} here means the first invocation crashed instead of getting errors
    assert [sorted(m.data) for m in out] == [["data", "header", "nested"]], [m.data for m in out]
    report = out[0].data
    for case in ("data", "nested", "header"):
        assert_error(report[case], "INVALID", retryable=False)
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.failed) == (1, 1, 0)
    assert await app.info("other") == (0, 0)
