"""docs/lua-api.md against the sandbox it documents, read through a real worker: a reference
that names a function the sandbox lacks, or leaves out one it has, or quotes a limit the code
no longer keeps, misleads every handler author who trusts it."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import AppFactory
from luaq.runtime.errors import ErrorKind
from luaq.runtime.lua.convert import (
    MAX_DEPTH,
    MAX_HEADER_DEPTH,
    MAX_TEXT,
    MAX_VALUES,
    TEXT_COST,
    VALUE_COST,
)
from luaq.runtime.lua.runtime import MEMORY_MARGIN
from luaq.runtime.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "lua-api.md"
MODULES = ("queue", "logger", "json", "time", "metrics")  # every module a function may list
TABLES = (*MODULES, "errors", "string", "table", "math", "utf8", "os", "coroutine")
# what the page must name in full; of the other libraries, it names only what luaq changes
COMPLETE = (*MODULES, "errors", "os", "msg")
CALL = re.compile(rf"\b({'|'.join((*TABLES, 'msg', 'err'))})[.:](\w+)\(")

# Reports what a handler's sandbox holds, with every module listed: the globals (read before
# the handler defines its own), the functions of each table and of a Message, the `errors`
# constants, and which of the error methods the test names an error object answers to.
SANDBOX = r"""
local globals = {}
for name in pairs(_G) do globals[#globals + 1] = name end

local function functions(prefix, t, found)
  for name, value in pairs(t) do
    if type(value) == "function" then found[#found + 1] = prefix .. "." .. name end
  end
end

function handle(p)
  local found = {}
  for _, name in ipairs(p.tables) do functions(name, _G[name], found) end
  functions("msg", queue.message(), found)
  local err = errors.new("probe")
  for _, name in ipairs(p.error_methods) do
    if type(err[name]) == "function" then found[#found + 1] = "err." .. name end
  end
  local constants = {}
  for name, value in pairs(errors) do
    if type(value) == "string" then constants[#constants + 1] = name end
  end
  queue.publish("out", {globals = globals, functions = found, constants = constants})
end
"""


def section(text: str, heading: str) -> str:
    """The part of the page under `heading`, up to the next heading of its level or above."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    end = re.compile(rf"\n#{{1,{len(level)}}} ").search(text, start + 1)
    return text[start : end.start() if end else len(text)]


def documented_globals(text: str) -> set[str]:
    """The names in the first column of the page's table of globals."""
    rows = [line for line in section(text, "### Globals").splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}


async def test_the_page_names_every_function_of_the_sandbox_and_nothing_else(
    apps: AppFactory,
) -> None:
    text = DOC.read_text()
    named = {f"{table}.{name}" for table, name in CALL.findall(text)}
    error_methods = sorted(name.split(".")[1] for name in named if name.startswith("err."))
    _, out = await apps.run(
        SANDBOX,
        [{"tables": list(TABLES), "error_methods": error_methods}],
        modules=list(MODULES),
    )
    found = out[0].data
    exposed = set(found["functions"])
    assert {"queue.publish", "msg.id", "err.kind"} <= named  # (the pattern reads the page)
    unnamed = {name for name in exposed - named if name.split(".")[0] in COMPLETE}
    assert named - exposed == set(), "named on the page, missing in the sandbox"
    assert unnamed == set(), "in the sandbox, missing on the page"
    assert set(found["globals"]) == documented_globals(text)
    kinds = set(re.findall(r"\berrors\.([A-Z][A-Z_]+)\b", text))
    assert set(found["constants"]) == kinds == set(ErrorKind.__members__)


def test_the_limits_on_the_page_are_the_codes() -> None:
    text = DOC.read_text()
    limits = section(text, "### Limits")
    quoted = [
        f"| {Settings.max_instructions:,} |",
        f"| {Settings.lua_max_memory // 2**20} |",
        f"{MEMORY_MARGIN // 2**20} MiB",
        f"{VALUE_COST} instructions",
        f"per {TEXT_COST} characters",
        f"{MAX_VALUES:,}; {MAX_TEXT // 2**20} MiB; {MAX_DEPTH} levels",
    ]
    assert [q for q in quoted if q not in limits] == []
    assert f"deeper than {MAX_HEADER_DEPTH} levels" in text
