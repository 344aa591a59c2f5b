"""The bounded standard library (runtime/lua/bounded.lua) behaves exactly as Lua's C functions
it stands in for: same results, same errors, whichever matcher (C or its Lua port) runs.

Each property compares, in one Lua state, the C function with its bounded version installed
into copies of the library tables: once with no budget left (every search runs on the Lua
matcher, or window by window), once with plenty (linear patterns run in C).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import lupa.lua54 as lupa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

LUA = lupa.LuaRuntime(unpack_returned_tuples=True)
COMPARE, COMPARE_TABLES, BOUNDED, COMPARE_SORT = LUA.execute(
    """
    local install = load((...), "=bounded")()
    local budget, spent = 0, 0
    local bounded = {os = {}}
    bounded.string, bounded.table, bounded.utf8, bounded.os.date = install(
      function(n) spent = spent + n end, function() return budget end, debug.getmetatable)

    -- what a call gave, as text: its results (a gmatch loop's, in full) or its error
    local function outcome(ok, ...)
      local results = table.pack(ok, ...)
      local parts = {}
      for i = 1, results.n do
        local v = results[i]
        if type(v) == "string" and not ok then -- positions and library prefixes vary with
          v = v:gsub("^[^:]*:%d+: ", ""):gsub("'%w+%.(%a+)'", "'%1'") -- how C was called
        end
        parts[i] = (math.type(v) or type(v)) ..
          ((type(v) == "table" or type(v) == "function") and "" or ":" .. tostring(v))
      end
      return table.concat(parts, " ")
    end

    local function call(lib, name, ...)
      if name ~= "gmatch" then return outcome(pcall(lib[name], ...)) end
      local args = table.pack(...)
      return outcome(pcall(function()
        local out = {}
        for a, b in lib.gmatch(table.unpack(args, 1, args.n)) do
          out[#out + 1] = tostring(a) .. "," .. tostring(b)
        end
        return table.concat(out, "|")
      end))
    end

    local function compare(left, library, name, ...)
      budget, spent = left, 0
      return call(_G[library], name, ...), call(bounded[library], name, ...), spent
    end

    -- table.insert or table.remove on a fresh {1, 2, 3} with a __len, each: results, and table
    local function compare_tables(name, ...)
      local function run(lib, ...)
        local t = setmetatable({1, 2, 3}, {__len = function(t) return rawlen(t) end})
        return call(lib, name, t, ...) .. " => " .. table.concat(t, ",", 1, rawlen(t))
      end
      return run(table, ...), run(bounded.table, ...)
    end
    -- the bounded function alone: what it gave, and what it charged
    local function bounded_only(left, library, name, ...)
      budget, spent = left, 0
      return call(bounded[library], name, ...), spent
    end
    -- table.sort of `values` (a table) in a table with __len, by a named comparator: results,
    -- and the table after
    local comparators = {
      ["<"] = function(a, b) return a < b end, [">"] = function(a, b) return a > b end,
      ["<="] = function(a, b) return a <= b end, always = function() return true end,
      never = function() return false end,
    }
    local function compare_sort(values, comparator)
      local function run(lib)
        local t = setmetatable({}, {__len = function(t) return rawlen(t) end})
        for i = 1, #values do t[i] = values[i] end
        local got = call(lib, "sort", t, comparators[comparator])
        local after = {}
        for i = 1, rawlen(t) do after[i] = tostring(t[i]) end
        return got .. " => " .. table.concat(after, ",")
      end
      return run(table), run(bounded.table)
    end
    return compare, compare_tables, bounded_only, compare_sort
    """,
    resources.files("luaq.runtime.lua").joinpath("bounded.lua").read_text(),
)
NO_BUDGET, PLENTY = 0, 10**12

PIECES = [
    *"ab()[]%.*+-?^$",
    *("%a", "%d", "%s", "%w", "%S", "%1", "%2", "%b()", "%f[%w]", "[a-c]", "[^ab]", "[%d%s]"),
    *("()", "%%", "a*", "b+", ".-", "%a?"),
]
patterns = st.lists(st.sampled_from(PIECES), max_size=6).map("".join)
subjects = st.text(alphabet="ab()^$ 1c%]x", max_size=14)
starts = st.none() | st.integers(-20, 20)
budgets = st.sampled_from([NO_BUDGET, PLENTY])
replacements = st.sampled_from(["<%0>", "%1", "x", "%%", "%2", "%", 5, "table", "function"])


def same(left: int, library: str, name: str, *args: Any) -> int:
    expected, got, spent = COMPARE(left, library, name, *args)
    assert got == expected, f"{name}{args}"
    return int(spent)


@settings(max_examples=400, deadline=None)
@given(budgets, subjects, patterns, starts, st.booleans())
def test_find(left: int, subject: str, pattern: str, init: int | None, plain: bool) -> None:
    same(left, "string", "find", subject, pattern, init, plain)


@settings(max_examples=300, deadline=None)
@given(budgets, subjects, patterns, starts)
def test_match_and_gmatch(left: int, subject: str, pattern: str, init: int | None) -> None:
    same(left, "string", "match", subject, pattern, init)
    same(left, "string", "gmatch", subject, pattern, init)


@settings(max_examples=300, deadline=None)
@given(budgets, subjects, patterns, replacements, st.none() | st.integers(-1, 3))
def test_gsub(left: int, subject: str, pattern: str, replacement: Any, limit: int | None) -> None:
    if replacement == "table":
        replacement = LUA.eval('{a = "A", ["("] = false, b = {}, [1] = 1}')
    elif replacement == "function":
        replacement = LUA.eval(
            'function(a, b) if a == "a" then return nil end return tostring(a) .. "." .. '
            "tostring(b) end"
        )
    same(left, "string", "gsub", subject, pattern, replacement, limit)


@settings(max_examples=100, deadline=None)
@given(
    st.text(alphabet="ab", min_size=1, max_size=12),
    st.integers(0, 300_000),
    st.integers(-5, 5),
    budgets,
)
def test_plain_search_window_by_window(needle: str, size: int, offset: int, left: int) -> None:
    """With no budget left a plain search of a long subject runs in windows of C searches."""
    subject = "a" * size + needle + "b" * 10
    same(left, "string", "find", subject, needle, max(1, size + offset), True)


def test_work_is_charged() -> None:
    def charged(library: str, name: str, *args: Any) -> tuple[str, float]:
        return BOUNDED(PLENTY, library, name, *args)  # type: ignore[no-any-return]

    assert charged("string", "rep", "ab", 1000) == ("boolean:true string:" + "ab" * 1000, 1250)
    # C would loop 10^18 times to make this
    assert charged("string", "rep", "", 10**18) == ("boolean:true string:", 0)
    assert charged("string", "rep", "x", 10**15)[1] > 10**15  # over any budget, before it runs
    assert charged("table", "move", LUA.table(1, 2, 3), 1, 3, 2)[1] == 3
    assert charged("table", "sort", LUA.table(3, 1, 2, 4))[1] == 4 * 2
    # a linear search in C is charged what it scanned: starts tried * pattern length + match
    assert charged("string", "find", "xxxxab", "ab") == ("boolean:true integer:5 integer:6", 10)
    assert charged("string", "find", "xxxxab", "a%a")[1] == 5 * 3 + 2
    assert charged("string", "find", "xxxx", "a%a")[1] == 5 * 3 + 4  # every start, in vain
    # a backtracking pattern runs on the Lua matcher: the count hook charges its steps
    assert charged("string", "find", "aaaa", "a*a*b") == ("boolean:true nil:nil", 0)
    # a replacement's length per match: every possible match when it has escapes, else those made
    assert charged("string", "gsub", "aaaa", "a", "%0%0")[1] == (5 + 4) + 4 * 5
    assert charged("string", "gsub", "aaaa", "a", "bbbbbbbbbb")[1] == (5 + 4) + 10 + 10 * 4
    assert charged("table", "unpack", LUA.table(), 1, 1000)[1] == 1000
    # C asks no stack space for more than a million values: it refuses at once
    assert charged("table", "unpack", LUA.table(), 1, 10**12)[1] == 10**6
    # concat and format: one per element, one per 8 bytes they make
    assert charged("table", "concat", LUA.table(*["ab"] * 100), "-")[1] == 100
    assert charged("table", "concat", LUA.table("x" * 1000, "y"))[1] == 1001 / 8
    assert charged("string", "format", "%s!", "x" * 799)[1] == 100
    # pack, packsize, unpack: 16 per byte of format; pack one per byte of the sizes it names,
    # before it makes them, and one per 8 bytes it made
    assert charged("string", "pack", "c200000000", "")[1] == 10 * 16 + 200_000_000 + 25_000_000
    assert charged("string", "pack", "i4" * 8, *[7] * 8)[1] == 16 * 16 + 4 * 8
    assert charged("string", "packsize", "b" * 100)[1] == 1600
    assert charged("string", "unpack", "b" * 100, "x" * 100)[1] == 1600
    # byte and codepoint one per value they give, char one per value, utf8.char 16
    assert charged("string", "byte", "x" * 1000, 1, -1)[1] == 1000
    assert charged("string", "byte", "x" * 1000, -100, 10**9)[1] == 100
    assert charged("utf8", "codepoint", "x" * 1000, 901, 1000)[1] == 100
    assert charged("string", "char", *[65] * 100)[1] == 100
    assert charged("utf8", "char", *[65] * 100)[1] == 1600
    # os.date 32 per byte of its format
    assert charged("os", "date", "%Y" * 50, 0) == ("boolean:true string:" + "1970" * 50, 3200)
    # work worth fewer instructions than a call to charge it is counted with the call
    assert charged("table", "unpack", LUA.table(1, 2, 3), 2)[1] == 0
    assert charged("table", "concat", LUA.table("ab", "cd", 7), "-")[1] == 0


@pytest.mark.parametrize(
    ("library", "name", "args"),
    [
        ("table", "unpack", ("t",)),
        ("table", "unpack", ("t", 2)),
        ("table", "unpack", ("t", 2, 5)),
        ("table", "unpack", ("t", -1, 1)),
        ("table", "unpack", ("t", "2", 3.0)),
        ("table", "unpack", ("t", "x")),
        ("table", "unpack", ("t", 1, 2.5)),
        ("table", "unpack", ("t", 1, 10**7)),
        ("table", "unpack", ("abc",)),
        ("table", "unpack", (None,)),
        ("table", "concat", ("t",)),
        ("table", "concat", ("t", ", ", 2)),
        ("table", "concat", ("t", 1, 1, 2)),
        ("table", "concat", ("t", ",", 1, 5)),
        ("table", "concat", ("t", ",", 3, 2)),
        ("table", "concat", ("t", {})),
        ("table", "concat", ("abc",)),
        ("table", "concat", (None,)),
        ("string", "format", ("%d-%s|%5.2f", 5, "x", 3.14159)),
        ("string", "format", ("%q", "a\nb\0")),
        ("string", "format", ("%d", "x")),
        ("string", "format", ("%d",)),
        ("string", "format", ("%y", 1)),
        ("string", "format", (None,)),
        ("string", "pack", ("<i4c3z", 7, "ab", "cd")),
        ("string", "pack", ("c2", "abc")),
        ("string", "pack", ("i17", 1)),
        ("string", "pack", ("c", "x")),
        ("string", "pack", (None,)),
        ("string", "packsize", ("!8i3d",)),
        ("string", "packsize", ("s",)),
        ("string", "unpack", ("<i2c2", "\x01\x00ab")),
        ("string", "unpack", ("i4", "ab")),
        ("string", "byte", ("abc",)),
        ("string", "byte", ("abc", -2, 10)),
        ("string", "byte", ("abc", 0, -5)),
        ("string", "byte", ("abc", 2.5)),
        ("string", "char", (72, 105)),
        ("string", "char", (256,)),
        ("utf8", "char", (72, 0x10FFFF)),
        ("utf8", "char", ("x",)),
        ("utf8", "codepoint", ("héllo", 1, -1)),
        ("utf8", "codepoint", ("abc", 0, 2)),
        ("utf8", "codepoint", ("\xff", 1)),
        ("os", "date", ("!%Y-%m-%d %H:%M:%S", 86400)),
        ("os", "date", ("!*t", 0)),
        ("os", "date", ("%Ez", 0)),
        ("os", "date", ({},)),
    ],
)
def test_unpack_concat_and_format(library: str, name: str, args: tuple[Any, ...]) -> None:
    """And the other bounded functions of a single C call: the same results and errors as C's.
    `t` stands for {"a", 2, "c", nil, "e"}."""
    table = LUA.execute('return {"a", 2, "c", nil, "e"}')
    values = [table if arg == "t" else LUA.table() if arg == {} else arg for arg in args]
    for left in (NO_BUDGET, PLENTY):
        same(left, library, name, *values)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(-5, 5) | st.sampled_from(["a", "b"]), max_size=40),
    st.sampled_from([None, "<", ">", "<=", "always", "never"]),
)
def test_sort_with_a_len_metamethod(values: list[Any], comparator: str | None) -> None:
    """With __len, sort runs in Lua: the same order, errors and table as C's."""
    expected, got = COMPARE_SORT(LUA.table(*values), comparator)
    assert got == expected


@settings(max_examples=30, deadline=None)
@given(st.permutations(range(400)))
def test_a_long_sort_with_a_len_metamethod(values: list[int]) -> None:
    expected, got = COMPARE_SORT(LUA.table(*values), ">")
    assert got == expected


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("insert", (1, "x")),
        ("insert", ("x",)),
        ("insert", (4, "x")),
        ("insert", (9, "x")),
        ("insert", (1.5, "x")),
        ("insert", ()),
        ("insert", (1, 2, 3)),
        ("remove", ()),
        ("remove", (1,)),
        ("remove", (4,)),
        ("remove", (9,)),
        ("remove", ("1",)),
        ("remove", ("x",)),
        ("sort", ()),
        ("sort", (5,)),
        ("unpack", ()),
        ("unpack", (2,)),
        ("concat", (",",)),
        ("concat", (",", 2, 4)),
    ],
)
def test_table_functions_with_a_len_metamethod(name: str, args: tuple[Any, ...]) -> None:
    """With __len, insert, remove and sort run in Lua, unpack and concat ask for the length once:
    the same results, errors and tables as C's."""
    expected, got = COMPARE_TABLES(name, *args)
    assert got == expected
