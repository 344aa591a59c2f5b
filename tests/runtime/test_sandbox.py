"""Sandbox escapes and runaway handlers (docs/lua-api.md "The sandbox"; docs/design.md "The async
Lua bridge").

Each attempt must fail inside the handler and leave the worker healthy: the next message is
still processed. Everything goes through Lua code run by the real worker.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import AppFactory
from luaq.runtime.errors import ErrorKind
from luaq.runtime.settings import Settings

# The handler runs the attempt in a pcall and reports what happened; {"ping": true} checks
# the worker afterwards.
ATTEMPT = r"""
function handle(p)
  if p.ping then
    queue.publish("out", {pong = true})
    return
  end
  local ok, value = pcall(function()
    %s
  end)
  queue.publish("out", {ok = ok, value = tostring(value), type = type(value)})
end
"""

# a Lua 5.4 binary chunk header followed by junk: what string.dump output starts with
BINARY = r"\27Lua\84\0\25\147\13\10\26\10\4\8\8\120\86\0\0\0\0\0\0\0\0\0\0\0\40\119\64\1"

ESCAPES = {
    "os.execute": 'return os.execute("touch " .. p.path)',
    "os.execute via index": 'return os["execute"]',
    "os.exit": "return os.exit",
    "os.getenv": 'return os.getenv("PATH")',
    "os.remove": "return os.remove",
    "io": "return io",
    "io.open": 'return io.open(p.path, "w")',
    "io.popen": 'return io.popen("touch " .. p.path)',
    "io via _G": "return _G.io",
    "debug": "return debug",
    "debug via _ENV": "return _ENV.debug",
    "debug.getregistry": "return debug.getregistry()",
    "string.dump": "return string.dump",
    "string.dump call": "return string.dump(function() end)",
    "string.dump as method": 'return ("x").dump',
    "string.dump method call": 'return ("x"):dump()',
    "load binary chunk": f'return load("{BINARY}")',
    "load binary chunk mode b": f'return load("{BINARY}", "x", "b")',
    "load binary chunk mode bt": f'return load("{BINARY}", "x", "bt")',
    "load binary chunk from reader": (
        f'local parts, i = {{"{BINARY}"}}, 0 return load(function() i = i + 1 return parts[i] end)'
    ),
    "python": "return python",
    "python.eval": 'return python.eval("1")',
    "python via rawget": 'return rawget(_G, "python")',
    "package": "return package",
    "package.loaded": "return package.loaded",
    "require os": 'return require("os")',
    "require io": 'return require("io")',
    "require debug": 'return require("debug")',
    "require _G": 'return require("_G")',
    "collectgarbage": "return collectgarbage",
    "collectgarbage call": 'return collectgarbage("count")',
    "dofile": "return dofile",
    "dofile call": 'return dofile("/etc/hostname")',
    "loadfile": "return loadfile",
    "loadfile call": 'return loadfile("/etc/hostname")',
    "string metatable rawset": 'return rawset(getmetatable(""), "__index", {})',
}


@pytest.mark.parametrize("attempt", list(ESCAPES.values()), ids=list(ESCAPES))
async def test_escape_attempt_fails_and_worker_stays_healthy(
    apps: AppFactory, tmp_path: Path, attempt: str
) -> None:
    target = tmp_path / "pwned"
    app, out = await apps.run(ATTEMPT % attempt, [{"path": str(target)}, {"ping": True}])
    report, pong = (m.data for m in out)
    # blocked: the attempt raised, or gave nothing usable (nil / false)
    assert report["ok"] is False or report["type"] in ("nil", "boolean"), report
    assert report["value"] != "true", report
    assert pong == {"pong": True}
    assert not target.exists()
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.failed) == (2, 2, 0)


async def test_bytecode_load_is_refused_but_source_load_works(apps: AppFactory) -> None:
    _, out = await apps.run(
        f"""
        function handle(p)
          local fn, err = load("{BINARY}")
          local text = load("return 40 + 2")
          queue.publish("out", {{
            binary_is_nil = fn == nil, err = tostring(err), text = text(),
          }})
        end
        """,
        ["go"],
    )
    report = out[0].data
    assert report["binary_is_nil"] is True
    assert "binary" in report["err"]
    assert report["text"] == 42


# -- reaching Python ------------------------------------------------------------------------------


async def test_no_python_object_is_reachable(apps: AppFactory) -> None:
    """Walk everything a handler can reach (globals, metatables, what the API returns, the error
    values of failed host calls) and look for lupa's Python object wrappers (userdata)."""
    _, out = await apps.run(
        r"""
        function handle(p)
          local roots = {
            env = _G, payload = p, string_metatable = getmetatable(""),
            message = queue.message(), headers = queue.message():headers(),
            info = queue.info("in"), decoded = json.decode('{"a": [1, {"b": 2}]}'),
            error = errors.new("x"), publish_error = select(2, queue.publish("missing", 1)),
            info_error = select(2, queue.info("missing")),
            json_error = select(2, json.decode("{")),
          }
          -- host calls that fail inside Python: what do they hand back?
          roots.encode_function = {pcall(json.encode, function() end)}
          roots.encode_bytes = {pcall(json.encode, "\xff")}
          roots.decode_bytes = {pcall(json.decode, "\xff")}
          roots.log_bytes = {pcall(logger.info, logger, "\xff")}
          roots.log_field_bytes = {pcall(logger.info, logger, "x", {f = "\xff"})}
          roots.log_key_bytes = {pcall(logger.info, logger, "x", {["\xff"] = 1})}

          local found, seen, visited = {}, {}, 0
          local function visit(value, path, depth)
            local t = type(value)
            if t == "userdata" then found[#found + 1] = path return end
            if depth > 12 or (t ~= "table" and t ~= "function") or seen[value] then return end
            seen[value] = true
            visited = visited + 1
            local mt = getmetatable(value)
            if mt ~= nil then visit(mt, path .. "<mt>", depth + 1) end
            if t == "table" then
              for k, v in next, value do
                visit(k, path .. "<key>", depth + 1)
                visit(v, path .. "." .. tostring(k), depth + 1)
              end
            end
          end
          for name, root in pairs(roots) do visit(root, name, 0) end
          queue.publish("out", {found = found, visited = visited})
        end
        """,
        ["go"],
    )
    report = out[0].data
    assert report["visited"] > 20  # the walk really went through the environment
    assert not report["found"], report["found"]  # paths to userdata; none: {} (empty table)


async def test_leaked_python_object_cannot_hijack_another_handler(apps: AppFactory) -> None:
    """Whatever a failing host call hands back, changing it must not change another function."""
    other = """
        function handle(p)
          queue.publish("out", {encoded = json.encode({1, 2})})
        end
        """
    app = await apps.start(
        r"""
        function handle(p)
          local ok, err = pcall(json.encode, "\xff")
          local mt = getmetatable(err)
          local changed = pcall(function()
            mt.__call = function() return true, "pwned", nil end
            mt.__index = function() return "pwned" end
          end)
          queue.publish("out", {err_type = type(err), mt_type = type(mt), changed = changed})
        end
        """,
        extra_entries=_other_function(other),
    )
    await app.publish("in", "tamper")
    await app.idle()
    await app.publish("other", "check")
    await app.idle()
    tamper, check = (m.data for m in await app.drain("out"))
    assert check == {"encoded": "[1,2]"}, tamper
    assert tamper["err_type"] != "userdata", tamper


# -- the string metatable and cross-handler tampering ---------------------------------------------


def _other_function(source: str) -> list[dict[str, Any]]:
    """A second function.lua entry with its own consumer on `other`."""
    return [
        {"name": "other_handler", "kind": "function.lua", "source": source, "method": "handle"},
        {"id": "other_worker", "kind": "queue.consumer", "queue": "other", "func": "other_handler"},
    ]


async def test_string_metatable_cannot_be_changed(apps: AppFactory) -> None:
    other = """
        function handle(p)
          queue.publish("out", {
            upper = ("x"):upper(), len = ("abc"):len(), rep = ("ab"):rep(2),
            mt_type = type(getmetatable("")),
          })
        end
        """
    app = await apps.start(
        """
        local function pwned() return "pwned" end
        function handle(p)
          local mt = getmetatable("")
          local report = {mt_type = type(mt)}
          report.set_index = pcall(function()
            getmetatable("").__index = {upper = pwned, len = pwned, rep = pwned}
          end)
          report.set_field = pcall(function() getmetatable("").__index.upper = pwned end)
          report.rawset = pcall(function() rawset(getmetatable(""), "__index", {}) end)
          report.setmetatable = pcall(setmetatable, "", {__index = {upper = pwned}})
          if type(mt) == "table" then
            pcall(function() mt.__index = {upper = pwned} end)
            pcall(function() mt.__index.upper = pwned end)
          end
          report.own_upper = ("x"):upper()
          report.own_len = ("abc"):len()
          queue.publish("out", report)
        end
        """,
        extra_entries=_other_function(other),
    )
    await app.publish("in", "tamper")
    await app.idle()
    await app.publish("other", "check")
    await app.idle()
    tamper, check = (m.data for m in await app.drain("out"))
    assert check == {"upper": "X", "len": 3, "rep": "abab", "mt_type": tamper["mt_type"]}
    assert tamper["own_upper"] == "X"
    assert tamper["own_len"] == 3
    assert tamper["setmetatable"] is False  # strings' metatable cannot be replaced from Lua
    assert tamper["rawset"] is False


async def test_one_function_cannot_tamper_with_another(apps: AppFactory) -> None:
    other = """
        function handle(p)
          queue.publish("out", {
            new = errors.new("e"):message(), invalid = errors.INVALID,
            is = errors.is(errors.new({kind = errors.INVALID}), errors.INVALID),
            upper = string.upper("x"), method = ("x"):upper(),
            concat = table.concat({"a", "b"}), floor = math.floor(1.5),
            json = json.encode({1}), publish_type = type(queue.publish),
            global = type(shared_by_tamperer), print_type = type(print),
          })
        end
        """
    app = await apps.start(
        """
        local function pwned() return "pwned" end
        function handle(p)
          local invalid = errors.INVALID
          errors.new = pwned
          errors.is = pwned
          errors.INVALID = "pwned"
          string.upper = pwned
          table.concat = pwned
          math.floor = pwned
          json.encode = pwned
          queue.publish_backup, queue.publish = queue.publish, nil
          _G.shared_by_tamperer = true
          print = pwned
          queue.publish_backup("out", {invalid = invalid})
        end
        """,
        extra_entries=_other_function(other),
    )
    await app.publish("in", "tamper")
    await app.idle()
    await app.publish("other", "check")
    await app.idle()
    tamper, check = (m.data for m in await app.drain("out"))
    assert check == {
        "new": "e",
        "invalid": tamper["invalid"],
        "is": True,
        "upper": "X",
        "method": "X",
        "concat": "ab",
        "floor": 1,
        "json": "[1]",
        "publish_type": "function",
        "global": "nil",
        "print_type": "function",
    }


# -- runaway handlers -----------------------------------------------------------------------------

# Runs away on the first attempt only, so the redelivered message then completes. `escaped`
# records work that finished although it is far beyond the budget of one invocation.
RUNAWAY = """
local attempts = {}
local escaped = false
function handle(p)
  local id = queue.message():id()
  attempts[id] = (attempts[id] or 0) + 1
  if p.mode == "runaway" and attempts[id] == 1 then
    %s
  end
  queue.publish("out", {name = p.name, attempt = attempts[id], escaped = escaped})
end
"""

RUNAWAYS = {
    "while true": "while true do end",
    "pcall in a loop": "while true do pcall(function() while true do end end) end",
    "string building": 'local s = "" while true do s = s .. "x" if #s > 4096 then s = "" end end',
    "recursion caught by pcall": "local function f() return pcall(f) end while true do f() end",
    # The message handler of xpcall runs when the budget error is raised. With `while true do
    # end` there, a failure would hang the suite, so it does 30 budgets' worth of work instead.
    "xpcall whose message handler loops": (
        "while true do xpcall(function() while true do end end, "
        "function() for i = 1, 30000000 do end escaped = true end) end"
    ),
    # 40 coroutines of 600,000 instructions each: 24 budgets' worth of work, in pieces that
    # each fit in one budget. (Bounded for the same reason.)
    "work spread over coroutines": (
        "for _ = 1, 40 do coroutine.wrap(function() for i = 1, 600000 do end end)() end "
        "escaped = true"
    ),
}

BUDGET = Settings(max_instructions=1_000_000, shutdown_timeout=5.0)


@pytest.mark.parametrize("loop", list(RUNAWAYS.values()), ids=list(RUNAWAYS))
async def test_runaway_handler_is_stopped(apps: AppFactory, loop: str) -> None:
    app, out = await apps.run(
        RUNAWAY % loop,
        [
            {"name": "runaway", "mode": "runaway"},
            {"name": "before", "mode": "ok"},
            {"name": "after", "mode": "ok"},
        ],
        settings=BUDGET,
    )
    got = sorted((m.data["name"], m.data["attempt"], m.data["escaped"]) for m in out)
    # the runaway invocation failed, its message came back and then completed
    assert got == [("after", 1, False), ("before", 1, False), ("runaway", 2, False)]
    stats = app.consumer.stats
    assert stats.errors == {"TIMEOUT": 1}
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (4, 3, 1, 1)


async def test_runaway_handler_does_not_stop_other_consumers(apps: AppFactory) -> None:
    other = """
        function handle(p)
          queue.publish("out", {name = "other " .. p})
        end
        """
    app, _ = await apps.run(
        RUNAWAY % "while true do end",
        [{"name": "runaway", "mode": "runaway"}],
        settings=BUDGET,
        extra_entries=_other_function(other),
    )
    await app.publish("other", "check")
    await app.idle()
    out = await app.drain("out")
    assert [m.data for m in out] == [{"name": "other check"}]
    assert app.consumer.stats.failed == 1
    assert app.consumer.stats.errors == {"TIMEOUT": 1}
    assert app.worker.consumers[1].stats.acked == 1


async def test_gc_finalizer_does_not_escape_the_budget(apps: AppFactory) -> None:
    """A `__gc` metamethod runs when the collector decides, with hooks off; it must not be a
    way to run unbounded code (30 budgets' worth here; `while true do end` would hang the
    worker for good). setmetatable refuses it."""
    app, out = await apps.run(
        """
        local finalized = false
        function handle(p)
          local refused = false
          if p == "plant" then
            local ok, err = pcall(setmetatable, {}, {__gc = function()
              for i = 1, 30000000 do end
              finalized = true
            end})
            refused = not ok and tostring(err):find("__gc") ~= nil
            for i = 1, 100000 do local garbage = {i} end
          end
          queue.publish("out", {name = p, finalized = finalized, refused = refused})
        end
        """,
        ["plant", "check"],
        settings=BUDGET,
    )
    assert [m.data for m in out] == [
        {"name": "plant", "finalized": False, "refused": True},
        {"name": "check", "finalized": False, "refused": False},
    ]
    assert app.consumer.stats.processed == 2


# -- memory ---------------------------------------------------------------------------------------


MEMORY = """
local attempts = {}
function handle(p)
  local id = queue.message():id()
  attempts[id] = (attempts[id] or 0) + 1
  if p.mode == "grow" and attempts[id] == 1 then
    local s = string.rep("x", 1024 * 1024)
    while true do s = s .. s end
  end
  local size = p.size and #string.rep("y", p.size)
  queue.publish("out", {name = p.name, attempt = attempts[id], size = size})
end
"""


async def test_memory_exhaustion_fails_the_invocation_not_the_worker(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="luaq.consumer")
    app, out = await apps.run(
        MEMORY,
        [
            {"name": "grow", "mode": "grow"},
            # after the failure the memory is given back: 8 MiB of the 64 MiB limit is fine
            {"name": "after", "mode": "ok", "size": 8 * 1024 * 1024},
        ],
        settings=Settings(lua_max_memory=64 * 1024 * 1024, shutdown_timeout=5.0),
    )
    got = sorted((m.data["name"], m.data["attempt"], m.data.get("size")) for m in out)
    assert got == [("after", 1, 8 * 1024 * 1024), ("grow", 2, None)]
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (3, 2, 1, 1)
    failures = [r for r in caplog.records if r.getMessage() == "handler failed"]
    assert len(failures) == 1
    assert "memory" in str(getattr(failures[0], "error", ""))


async def test_log_text_is_charged_to_the_budget(apps: AppFactory) -> None:
    """A log line costs its collector by the byte: 5,000 lines of 8 KiB each (40 MiB of log) is
    well over a budget of a million instructions, though the loop itself is a few thousand."""
    app, out = await apps.run(
        """
        function handle(p)
          local text = string.rep("x", 8192)
          for _ = 1, 5000 do logger:info(text) end
          queue.publish("out", {done = true})
        end
        """,
        ["go"],
        Settings(max_instructions=1_000_000, shutdown_timeout=5.0),
        modules=["queue", "logger"],
        in_queue={"dead_letter": {"max_attempts": 1}},
    )
    assert out == []
    assert app.consumer.stats.errors == {ErrorKind.TIMEOUT: 1}
