"""Hostile handlers: a handler can never reach another's invocation, and no handler can
stop the worker.

Every case runs a real `luaq run` process with two consumers on the memory driver: `attacker`
runs the hostile handler; `victim` runs an honest one that may publish to `vault`, which the
attacker may not. The attacker itself publishes the victim's next message, before or while it
attacks, so that message comes after the attack. Each case then checks that the victim handled
it normally, that no attacker code ran with the victim's identity or data (such code logs
"pwned"), and that the worker still stops on SIGTERM within its shutdown timeout.
"""

from __future__ import annotations

import signal
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from processes import Process, Spawner, summary, wait_until, write_app, write_jsonl

SHUTDOWN = 3.0  # --shutdown-timeout of every worker here
MODULES = ["queue", "logger", "json", "time", "metrics"]

VICTIM = """\
-- Honest, and allowed to publish to `vault`. It uses what attackers tamper with: error objects,
-- its message and headers, publishing. With `notify` it wakes the attacker; with `wait` it
-- stays in flight until the attacker publishes to `signal`.
function handle(p)
  local msg = queue.message()
  local probe = errors.new({kind = errors.INVALID, message = "probe"})
  if p.notify then assert(queue.publish("attack", {step = p.notify})) end
  if p.wait then
    local deadline = time.now() + 10
    while queue.info("signal").message_count == 0 and time.now() < deadline do
      time.sleep(0.01)
    end
  end
  local published = queue.publish("vault", {n = p.n})
  logger:info("victim handled", {
    n = p.n, kind = probe:kind(), message = probe:message(), published = published == true,
  })
end
"""


def hostile_app(directory: Path, attacker: str) -> Path:
    (directory / "attacker.lua").write_text(textwrap.dedent(attacker))
    (directory / "victim.lua").write_text(VICTIM)

    def function(name: str) -> dict[str, Any]:
        source = f"file://{name}.lua"
        return {"name": f"{name}_fn", "kind": "function.lua", "source": source} | {
            "method": "handle",
            "modules": MODULES,
        }

    def may_publish_to(name: str, *queues: str) -> dict[str, Any]:
        rule = {"actions": "queue.publish.queue", "resources": list(queues), "effect": "allow"}
        return {"name": name, "kind": "security.policy", "policy": rule}

    def consumer(name: str, queue: str, policy: str) -> dict[str, Any]:
        security = {"groups": ["handlers"], "policies": [policy]}
        return {"id": name, "kind": "queue.consumer", "queue": queue, "func": name + "_fn"} | {
            "security": security
        }

    return write_app(
        directory / "app.yaml",
        [
            {"name": "broker", "kind": "queue.driver.memory"},
            # each attack runs once: a failed one is rejected, not retried
            {"name": "attack", "kind": "queue.queue", "driver": "broker"}
            | {"dead_letter": {"max_attempts": 1}},
            *(
                {"name": name, "kind": "queue.queue", "driver": "broker"}
                for name in ("inbox", "vault", "signal")
            ),
            function("attacker"),
            function("victim"),
            {"name": "may_publish", "kind": "security.policy", "groups": ["handlers"]}
            | {"policy": {"actions": "queue.publish", "effect": "allow"}},
            may_publish_to("attacker_queues", "app:inbox", "app:attack", "app:signal"),
            may_publish_to("victim_queues", "app:vault", "app:attack"),
            consumer("attacker", "attack", "attacker_queues"),
            consumer("victim", "inbox", "victim_queues"),
        ],
    )


@dataclass
class Arena:
    """A worker running an attacker and a victim."""

    process: Process

    def logged(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.process.logs() if line.get("msg") == message]

    def failures(self, consumer: str) -> list[dict[str, Any]]:
        """Its failures: the attacks run once, so each is logged as given up (rejected)."""
        lines = self.logged("handler failed") + self.logged("attempts exhausted, rejected")
        return [line for line in lines if line["consumer"] == consumer]

    def wait_for(self, message: str, count: int = 1, timeout: float = 20) -> None:
        wait_until(lambda: len(self.logged(message)) >= count, timeout, f"{count} x {message!r}")

    def stop(self) -> dict[str, dict[str, float]]:
        """SIGTERM; the worker must exit 0 within its shutdown timeout. Returns the summary."""
        self.process.popen.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = self.process.wait(timeout=SHUTDOWN + 5)
        elapsed = time.monotonic() - sent
        assert code == 0, self.process.stderr[-3000:]
        assert elapsed < SHUTDOWN + 1, f"exited {elapsed:.1f}s after SIGTERM"
        return summary(self.process.stdout)


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Any]:
    spawner = Spawner(tmp_path)

    def start(attacker: str, steps: int = 1, *flags: str) -> Arena:
        app = hostile_app(tmp_path, attacker)
        inputs = [{"queue": "attack", "data": {"step": step}} for step in range(1, steps + 1)]
        messages = write_jsonl(tmp_path / "input.jsonl", inputs)
        return Arena(
            spawner("run", app, "--input", messages, "--shutdown-timeout", str(SHUTDOWN), *flags)
        )

    yield start
    spawner.stop_all()


def victim_unharmed(arena: Arena, victim_failures: int = 0) -> dict[str, dict[str, float]]:
    """The victim handled its next message as it should, no attacker code ran as the victim,
    and the worker stops on SIGTERM in time. Returns the summary."""
    arena.wait_for("victim handled")
    handled = arena.logged("victim handled")[0]
    assert handled["consumer"] == "app:victim"
    assert handled["fields"] == {"n": 1, "kind": "INVALID", "message": "probe", "published": True}
    assert not arena.logged("pwned"), arena.logged("pwned")
    assert len(arena.failures("app:victim")) == victim_failures, arena.failures("app:victim")
    stats = arena.stop()
    assert stats["app:victim"]["acked"] == 1
    assert not arena.logged("pwned"), arena.logged("pwned")
    return stats


# -- one invocation reaching into another's ---------------------------------------------------


def test_a_yielded_value_with_eq_cannot_pass_for_finished(arena: Any) -> None:
    """Taken for finished, the runner would go back to the pool with the attacker's code on its
    stack, and run the next delivery of any consumer: reading it, publishing as its consumer,
    acking it unprocessed."""
    attack = arena("""
        local anything = setmetatable({}, {__eq = function() return true end})
        function handle(p)
          assert(queue.publish("inbox", {n = 1}))
          local _, payload = coroutine.yield(anything)
          logger:warn("pwned", {
            payload = payload, published = queue.publish("vault", {stolen = payload}) == true,
          })
        end
        """)
    victim_unharmed(attack)
    [failure] = attack.failures("app:attacker")
    assert failure["kind"] == "INVALID"
    assert "yielded outside of a coroutine it created" in failure["error"]


def test_a_yielded_value_with_eq_cannot_forge_a_host_call(arena: Any) -> None:
    # the bridge asks "is it FINISHED?", then "is it a request?": false, then true
    attack = arena("""
        local asked = 0
        local forged = setmetatable({}, {__eq = function() asked = asked + 1 return asked == 2 end})
        function handle(p)
          assert(queue.publish("inbox", {n = 1}))
          coroutine.yield(forged, "sleep", 0)
          logger:warn("pwned", {served = "a forged sleep"})
        end
        """)
    victim_unharmed(attack)
    assert attack.failures("app:attacker")[0]["kind"] == "INVALID"


def test_the_shared_error_metatable_is_out_of_reach(arena: Any) -> None:
    """Every sandbox's errors share one metatable: changing its `kind` used to run the
    attacker's code inside the victim's err:kind(), with the victim's permissions."""
    attack = arena("""
        function handle(p)
          local reached = {}
          for _, path in ipairs({"__index", "__metatable", "__tostring"}) do
            local found = errors.new("x")[path]
            if type(found) == "table" then
              reached[#reached + 1] = path
              found.kind = function(self)
                logger:warn("pwned", {published = queue.publish("vault", {stolen = 1}) == true})
                return "INVALID"
              end
            end
          end
          logger:info("error metatable", {reached = reached, getmetatable = tostring(
            getmetatable(errors.new("x")))})
          assert(queue.publish("inbox", {n = 1}))
        end
        """)
    victim_unharmed(attack)
    [report] = attack.logged("error metatable")
    assert report["fields"]["reached"] == {}
    assert report["fields"]["getmetatable"] == "false"


def test_the_shared_error_metatable_cannot_get_a_finalizer(arena: Any) -> None:
    """A __gc on the shared metatable would run, hooks off, for every error collected."""
    attack = arena("""
        function handle(p)
          local shared = errors.new("x").__index
          if type(shared) == "table" then shared.__gc = function() while true do end end end
          assert(queue.publish("inbox", {n = 1}))
          for i = 1, 200000 do local garbage = errors.new("garbage") end
        end
        """)
    victim_unharmed(attack)


def test_a_kept_coroutine_cannot_close_another_invocation_in_flight(arena: Any) -> None:
    """The attacker keeps its runner; the victim is handed that runner next and waits in a host
    call; the attacker then closes it."""
    attack = arena("""
        local kept
        function handle(p)
          if p.step == 1 then
            kept = coroutine.running()
            assert(queue.publish("inbox", {n = 1, notify = 2, wait = true}))
            return
          end
          local closed, why = pcall(function() assert(coroutine.close(kept)) end)
          if closed then logger:warn("pwned", {closed = "the victim's invocation"}) end
          logger:info("close refused", {why = tostring(why)})
          assert(queue.publish("signal", {}))
        end
        """)
    victim_unharmed(attack)
    [refused] = attack.logged("close refused")
    assert "belongs to another invocation" in refused["fields"]["why"]


def test_a_kept_coroutine_cannot_run_code_in_a_parked_runner(arena: Any) -> None:
    """Once the victim's invocation is over its runner is parked, still knowing the victim's
    delivery: resuming it ran attacker code there, reading the victim's headers."""
    attack = arena("""
        local kept
        function handle(p)
          if p.step == 1 then
            kept = coroutine.running()
            assert(queue.publish("inbox", {n = 1, notify = 2, wait = true},
              {authorization = "Bearer victim-secret"}))
            return
          end
          -- this runs on another runner, the victim holding `kept`: let it finish, and wait
          -- until its runner is parked again
          assert(queue.publish("signal", {}))
          local deadline = time.now() + 10
          while queue.info("vault").message_count == 0 and time.now() < deadline do
            time.sleep(0.01)
          end
          local resumed, why = pcall(function()
            assert(coroutine.resume(kept, function()
              local msg = queue.message()
              logger:warn("pwned", {headers = msg and msg:headers()})
            end))
          end)
          logger:info("resume refused", {resumed = resumed, why = tostring(why)})
        end
        """)
    victim_unharmed(attack)
    [refused] = attack.logged("resume refused")
    assert refused["fields"]["resumed"] is False
    assert "belongs to another invocation" in refused["fields"]["why"]


def test_coroutines_of_earlier_invocations_cannot_multiply_the_budget(arena: Any) -> None:
    """Twenty invocations each leave a coroutine behind; the 21st runs them all. Charged to
    the invocations that made them, that was twenty budgets' worth of work in one."""
    attack = arena(
        """
        local saved = {}
        function handle(p)
          if p.step <= 20 then
            saved[#saved + 1] = coroutine.create(function()
              while true do
                for i = 1, 1000 do end
                coroutine.yield()
              end
            end)
            return
          end
          assert(queue.publish("inbox", {n = 1}))
          local slices = 0 -- of about 1,000 instructions each
          for _, co in ipairs(saved) do
            while pcall(function() assert(coroutine.resume(co)) end) do slices = slices + 1 end
          end
          logger:info("slices", {slices = slices})
        end
        """,
        21,
        "--max-instructions",
        "1000000",
    )
    victim_unharmed(attack)
    [report] = attack.logged("slices")
    assert report["fields"]["slices"] < 1000, "more work than one budget of 1,000,000 pays for"


# -- handler code and C calls outside the budget -----------------------------------------------

# The attacker publishes the victim's message, then attacks as its last act. Each attack used
# to hang the worker for good (or for the better part of a minute): the victim would never run.
ATTACK = """
local function forever() while true do end end
function handle(p)
  assert(queue.publish("inbox", {n = 1}))
  %s
end
"""

OUTSIDE_THE_BUDGET = {
    "__tostring of a returned error": "return nil, setmetatable({}, {__tostring = forever})",
    "__tostring of a raised error": "error(setmetatable({}, {__tostring = forever}))",
    "__tostring that makes a host call": (
        'return nil, setmetatable({}, {__tostring = function() queue.info("inbox") end})'
    ),
    "__pairs of data to json.encode": "json.encode(setmetatable({}, {__pairs = forever}))",
    "__index of data to json.encode": "json.encode(setmetatable({1, nil, 3}, {__index = forever}))",
    "__index of logger fields": 'logger:info("x", setmetatable({1, nil, 3}, {__index = forever}))',
    "__index of data to publish": (
        'queue.publish("signal", setmetatable({1, nil, 3}, {__index = forever}))'
    ),
    "string.rep of empty strings": 'return #string.rep("", 1e18)',
    "string.rep of an empty string and separator": 'return #("").rep("", 1e18, "")',
    "table.move over nils": "table.move({}, 1, math.maxinteger - 1, 1, {})",
    "table.remove with a lying __len": (
        "table.remove(setmetatable({}, {__len = function() return math.maxinteger - 1 end}), 1)"
    ),
    "table.insert with a lying __len": (
        "table.insert(setmetatable({}, {__len = function() return math.maxinteger - 2 end}),"
        ' 1, "x")'
    ),
    "a backtracking pattern": 'string.find(string.rep("a", 24), string.rep("a*", 12) .. "b")',
    "a backtracking pattern as a method": 'return ("a"):rep(24):match(("(a*)"):rep(12) .. "$b")',
    "a backtracking gsub": 'string.gsub(string.rep("a", 24), string.rep("a-", 12) .. "b", "")',
    "__tostring of a metric name": (
        "metrics.counter(setmetatable({}, {__tostring = forever}), {})"
    ),
    "__index of metric labels": (
        'metrics.counter("n", setmetatable({1, nil, 3}, {__index = forever}))'
    ),
    # single C calls whose work grew with a size the budget did not see
    "table.unpack of nils": "for i = 1, 1e9 do table.unpack({}, 1, 999000) end",
    "table.sort with a lying __len": (
        "table.sort(setmetatable({}, {__len = function() return (1 << 31) - 2 end}), rawequal)"
    ),
    "a long gsub replacement": (
        'local s, r = ("a"):rep(1e5), ("%0"):rep(20000) for i = 1, 1e9 do s:gsub("", r) end'
    ),
    "table.concat of empty strings": (
        'local t = {} for i = 1, 999000 do t[i] = "" end for i = 1, 1e9 do table.concat(t) end'
    ),
    "string.format of a long string": (
        'local s = ("x"):rep(2^24) for i = 1, 1e9 do string.format("%s", s) end'
    ),
    "reading the shape of a big table": (
        "local t = {type} for i = 2, 990000 do t[i] = true end for i = 1, 1e9 do json.encode(t) end"
    ),
    "UTF-8 checks of long texts": (
        'local s = ("x"):rep(2^24) .. "\\xff" for i = 1, 1e9 do json.decode(s) end'
    ),
    "a long queue id": 'local id = ("x"):rep(2^24) for i = 1, 1e9 do queue.info(id) end',
    "json.decode of integers beyond a float": (
        'local text = "[" .. ("1"):rep(4000) .. "]" for i = 1, 1e9 do json.decode(text) end'
    ),
}


@pytest.mark.parametrize("attack", list(OUTSIDE_THE_BUDGET.values()), ids=list(OUTSIDE_THE_BUDGET))
def test_no_handler_code_or_c_call_runs_outside_the_budget(arena: Any, attack: str) -> None:
    victim_unharmed(arena(ATTACK % attack))


# Single C calls whose work grows with a number or a format rather than with the size of their
# operands (0.1 to 0.5 s each at most): a loop of them ran for weeks on one budget.
BY_THEIR_WORK = {
    "string.pack of a huge size": 'for i = 1, 1e9 do string.pack("c200000000", "") end',
    "string.packsize of a long format": (
        'local f = ("b"):rep(1e7) for i = 1, 1e9 do string.packsize(f) end'
    ),
    "string.unpack of a long format": (
        'local f = ("b"):rep(999000) for i = 1, 1e9 do string.unpack(f, f) end'
    ),
    "load of a long chunk": 'local s = ("x=1 "):rep(5e6) for i = 1, 1e9 do load(s) end',
    "os.date of a long format": 'local f = ("%c"):rep(1e6) for i = 1, 1e9 do os.date(f) end',
    "string.byte of a long string": (
        'local s = ("x"):rep(999000) for i = 1, 1e9 do s:byte(1, -1) end'
    ),
    "utf8.codepoint of a long string": (
        'local s = ("x"):rep(999000) for i = 1, 1e9 do utf8.codepoint(s, 1, -1) end'
    ),
    "string.char of many values": (
        "local function f(...) for i = 1, 1e9 do string.char(...) end end"
        " f(string.byte(('x'):rep(300000), 1, -1))"
    ),
    "utf8.char of many values": (
        "local function f(...) for i = 1, 1e9 do utf8.char(...) end end"
        " f(string.byte(('x'):rep(300000), 1, -1))"
    ),
}


@pytest.mark.parametrize("attack", list(BY_THEIR_WORK.values()), ids=list(BY_THEIR_WORK))
def test_c_calls_are_charged_by_their_work(arena: Any, attack: str) -> None:
    running = arena(ATTACK % attack)
    victim_unharmed(running)
    [failure] = running.failures("app:attacker")
    assert failure["kind"] == "TIMEOUT"


@pytest.mark.parametrize(
    "module",
    [
        "setmetatable(_G, {__index = function() while true do end end})",
        "return setmetatable({}, {__index = function() while true do end end})",
        "error(setmetatable({}, {__tostring = function() while true do end end}))",
    ],
    ids=["__index of the environment", "__index of the returned table", "__tostring of an error"],
)
def test_luaq_check_reads_a_hostile_module_within_the_budget(tmp_path: Path, module: str) -> None:
    spawner = Spawner(tmp_path)
    try:
        process = spawner("check", hostile_app(tmp_path, module))
        assert process.wait(timeout=20) == 2
    finally:
        spawner.stop_all()
    assert "attacker_fn: source:" in process.stderr, process.stderr
    assert "1 problem(s), nothing was started" in process.stderr


# -- memory ----------------------------------------------------------------------------------

FILL = "pcall(function() while true do hog[#hog + 1] = string.rep('abcdefgh', 8192) end end)"


def test_a_full_lua_state_fails_the_delivery_it_cannot_take_not_the_worker(arena: Any) -> None:
    """The attacker fills --lua-max-memory and holds it while the victim's message arrives:
    making that payload into Lua tables used to abort the process (a Lua panic). Now the
    delivery fails, is retried, and goes through once the memory is given back."""
    attack = arena(
        f"""
        function handle(p)
          local big = {{}}
          for i = 1, 20000 do big[i] = {{i = i, text = "some text"}} end
          assert(queue.publish("inbox", {{n = 1, big = big}}))
          big = nil
          local hog = {{}}
          {FILL}
          time.sleep(0.3)
        end
        """,
        1,
        "--lua-max-memory",
        "64",
    )
    attack.wait_for("victim handled")
    failures = attack.failures("app:victim")
    assert failures, "the victim's first attempt found the Lua state full"
    for failure in [*failures, *attack.failures("app:attacker")]:
        assert "not enough memory" in failure["error"], failure
    victim_unharmed(attack, len(failures))


def test_json_decode_with_a_full_lua_state_fails_in_the_handler(arena: Any) -> None:
    """Decoding into a full state used to throw a Lua error across Python's frames, which
    corrupted the interpreter and hung it."""
    attack = arena(
        f"""
        function handle(p)
          assert(queue.publish("inbox", {{n = 1}}))
          local text = "[" .. string.rep('{{"a":1}},', 20000) .. "{{}}]"
          local hog = {{}}
          {FILL}
          local ok, value, err = pcall(json.decode, text)
          hog = nil
          logger:info("decoded", {{ok = ok, error = tostring(err or value)}})
        end
        """,
        1,
        "--lua-max-memory",
        "64",
    )
    victim_unharmed(attack)
    [decoded] = attack.logged("decoded")
    assert decoded["fields"] == {"ok": False, "error": "not enough memory"}


@pytest.mark.parametrize(
    ("call", "kind"), [("queue.info", "NOT_FOUND"), ("metrics.counter", "INVALID")]
)
def test_an_error_quoting_a_huge_name_is_cut_not_pushed_whole(
    arena: Any, call: str, kind: str
) -> None:
    """A 16 MiB name in a 32 MiB state: the error quoting it did not fit. queue.info's was pushed
    outside protected mode (a Lua panic: the process aborted), metrics.counter's across lupa's
    frames (the process hung on the GIL, deaf to SIGTERM)."""
    attack = arena(
        f"""
        function handle(p)
          assert(queue.publish("inbox", {{n = 1}}))
          local name = string.rep("!", 2^20) -- (no metric name)
          for i = 1, 4 do name = name .. name end
          local ok, err = {call}(name)
          logger:info("refused", {{kind = err:kind(), size = #err:message()}})
        end
        """,
        1,
        "--lua-max-memory",
        "32",
    )
    victim_unharmed(attack)
    [refused] = attack.logged("refused")
    assert refused["fields"]["kind"] == kind
    assert refused["fields"]["size"] < 10_000


# a state full to the byte: pieces of 1 MiB, then ever smaller ones, then bare tables (no
# closure is made once it is full: every function is made beforehand)
FULL = """
local hog, size = {}, 0
local function grow() while true do hog = {hog, string.rep("x", size)} end end
local function grow_tables() while true do hog = {hog} end end
local function fill()
  for _, piece in ipairs({2^20, 2^16, 2^12, 2^8, 2^4}) do
    size = piece
    pcall(grow)
  end
  pcall(grow_tables)
end
"""

NESTED_DATA_CALLS = {
    "queue.publish": 'queue.publish, "signal", nested',
    "json.encode": "json.encode, nested",
    "logger": 'logger.info, logger, "x", nested',
    "metrics labels": 'metrics.counter, "n", nested',
}


@pytest.mark.parametrize("call", list(NESTED_DATA_CALLS.values()), ids=list(NESTED_DATA_CALLS))
def test_reading_nested_data_from_a_full_state_fails_in_the_handler(arena: Any, call: str) -> None:
    """Reading nested data makes a reference per level in Lua's registry, which grows: with the
    state full, that allocation failed outside protected mode (publish: a Lua panic) or across
    lupa's frames (the others: a deadlock or a crash)."""
    attack = arena(
        FULL
        + f"""
        function handle(p)
          assert(queue.publish("inbox", {{n = 1}}))
          local nested = {{}}
          for i = 1, 99 do nested = {{nested}} end
          fill()
          local ok, first, second = pcall({call})
          hog = nil
          logger:info("called", {{ok = ok, first = tostring(first), second = tostring(second)}})
        end
        """,
        1,
        "--lua-max-memory",
        "16",
    )
    victim_unharmed(attack)
    [called] = attack.logged("called")
    outcome = called["fields"]
    # it went through (the reserve), or the invocation was told there is no memory
    assert outcome["ok"] is True or outcome["first"] == "not enough memory", outcome


def test_luaq_check_reports_an_error_quoting_a_huge_name(tmp_path: Path) -> None:
    """The metrics trick at a module's top level hung `luaq check` until its time limit."""
    module = """
        local function mib(n, c)
          local s = string.rep(c, 2^20)
          while #s < n * 2^20 do s = s .. s end
          return s
        end
        local hog = {mib(256, "x"), mib(128, "y")} -- 384 MiB of the 512
        local name = mib(64, "!") -- and 64 MiB the error would quote
        assert(metrics.counter(name))
        """
    spawner = Spawner(tmp_path)
    try:
        process = spawner("check", hostile_app(tmp_path, module))
        started = time.monotonic()
        assert process.wait(timeout=30) == 2
        elapsed = time.monotonic() - started
    finally:
        spawner.stop_all()
    assert "attacker_fn: source:" in process.stderr, process.stderr
    assert "metric name" in process.stderr, process.stderr
    assert elapsed < 15, f"the check took {elapsed:.1f}s"


# -- conversions between Lua and Python --------------------------------------------------------

BIG_BUDGET = ("--max-instructions", str(10**10))  # so that the value limit, not the budget, stops


def test_json_encode_of_a_dag_is_refused_past_the_value_limit(arena: Any) -> None:
    """t = {t, t} twenty times: 21 Lua tables, two million values once written out."""
    attack = arena(
        """
        function handle(p)
          assert(queue.publish("inbox", {n = 1}))
          local t = {}
          for i = 1, 20 do t = {t, t} end
          local text, err = json.encode(t)
          logger:info("encoded", {encoded = text ~= nil, kind = err and err:kind(),
            error = tostring(err)})
        end
        """,
        1,
        *BIG_BUDGET,
    )
    victim_unharmed(attack)
    [encoded] = attack.logged("encoded")
    assert encoded["fields"]["encoded"] is False
    assert encoded["fields"]["kind"] == "INVALID"
    assert "more than 1000000 values" in encoded["fields"]["error"]


def test_json_decode_of_a_huge_array_is_refused_past_the_value_limit(arena: Any) -> None:
    attack = arena(
        """
        function handle(p)
          assert(queue.publish("inbox", {n = 1}))
          local value, err = json.decode("[" .. string.rep("[],", 1500000) .. "[]]")
          logger:info("decoded", {decoded = value ~= nil, kind = err and err:kind()})
        end
        """,
        1,
        *BIG_BUDGET,
    )
    victim_unharmed(attack)
    [decoded] = attack.logged("decoded")
    assert decoded["fields"] == {"decoded": False, "kind": "INVALID"}


def test_json_integers_beyond_64_bits_are_floats_and_beyond_a_float_invalid(arena: Any) -> None:
    """An integer of 400 digits raised an OverflowError: "internal error", charged nothing."""
    attack = arena(
        ATTACK
        % """
        local got = {}
        for _, digits in ipairs({30, 400, 5000}) do
          local value, err = json.decode("[" .. ("7"):rep(digits) .. "]")
          got[#got + 1] = value and math.type(value[1]) or err:kind() .. ": " .. err:message()
        end
        logger:info("decoded", {got = got})
        """
    )
    victim_unharmed(attack)
    [decoded] = attack.logged("decoded")
    floating, *refused = decoded["fields"]["got"]
    assert floating == "float"
    for problem in refused:
        assert problem.startswith("INVALID: json.decode: "), problem
        assert "beyond" in problem, problem


def test_a_message_with_integers_beyond_a_float_is_poison_not_retried(tmp_path: Path) -> None:
    """Such a message failed INTERNAL at every attempt: an error of luaq's, retried as such."""
    app = hostile_app(tmp_path, "function handle(p) logger:info('got', {n = p.n}) end")
    messages = tmp_path / "input.jsonl"
    messages.write_text(
        f'{{"queue": "attack", "data": {{"n": {"9" * 400}}}}}\n'
        f'{{"queue": "attack", "data": {{"n": {"9" * 30}}}}}\n'
    )
    spawner = Spawner(tmp_path)
    try:
        process = spawner("run", app, "--input", messages, "--shutdown-timeout", str(SHUTDOWN))
        arena = Arena(process)
        arena.wait_for("got")

        def poison() -> list[dict[str, Any]]:
            return [line for line in process.logs() if line.get("reason") == "poison"]

        wait_until(lambda: bool(poison()), what="the message given up as poison")
        [given_up] = poison()
        assert given_up["consumer"] == "app:attacker"
        assert given_up["kind"] == "INVALID"
        assert "beyond the range of a float" in given_up["error"], given_up
        assert float(arena.logged("got")[0]["fields"]["n"]) == float("9" * 30)
        arena.stop()
    finally:
        spawner.stop_all()
    assert not [line for line in process.logs() if line.get("kind") == "INTERNAL"]


def test_conversions_are_charged_to_the_budget(arena: Any) -> None:
    """Each json.encode of 2,047 values is a few instructions of Lua: a loop of them used to
    run for ever on one budget."""
    attack = arena(
        ATTACK
        % """
        local t = {}
        for i = 1, 10 do t = {t, t} end
        for i = 1, 1e9 do json.encode(t) end
        """
    )
    victim_unharmed(attack)
    [failure] = attack.failures("app:attacker")
    assert failure["kind"] == "TIMEOUT"


# -- logs -------------------------------------------------------------------------------------


def test_log_lines_are_capped(arena: Any) -> None:
    attack = arena(
        ATTACK
        % """
        logger:info(string.rep("m", 2^20), {field = string.rep("f", 2^20), n = 7})
        error(string.rep("e", 2^20), 0)
        """
    )
    victim_unharmed(attack)
    lines = attack.process.stderr.splitlines()
    assert max(len(line.encode()) for line in lines) <= 65536
    [failure] = attack.failures("app:attacker")
    assert failure["error"].startswith("eeee")
    assert failure["error"].endswith("more bytes)")
    [logged] = [line for line in attack.process.logs() if line["msg"].startswith("mmmm")]
    assert logged["fields"]["n"] == 7
    assert len(logged["fields"]["field"]) < 10_000


def test_an_invalid_sleep_is_an_invalid_argument_not_a_traceback(arena: Any) -> None:
    attack = arena(
        ATTACK
        % """
        for _, seconds in ipairs({0/0, -1, "1"}) do
          local ok, err = time.sleep(seconds)
          logger:info("slept", {ok = ok == true, kind = err and err:kind()})
        end
        """
    )
    victim_unharmed(attack)
    slept = [line["fields"] for line in attack.logged("slept")]
    assert slept == [{"ok": False, "kind": "INVALID"}] * 3
    assert not [line for line in attack.process.logs() if "exception" in line]
