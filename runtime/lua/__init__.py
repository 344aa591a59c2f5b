"""The Lua bridge: `runtime` holds the process's Lua state, loads function entries and runs
their invocations as coroutines; `convert` carries values across; bridge.lua is the Lua half,
and bounded.lua the sandbox's bounded C functions."""

from .runtime import (
    ACKED,
    Host,
    Invoke,
    LuaHandler,
    LuaLoadError,
    LuaRuntime,
    Outcome,
    SettleEarly,
    Verdict,
    Watch,
)

__all__ = [
    "ACKED",
    "Host",
    "Invoke",
    "LuaHandler",
    "LuaLoadError",
    "LuaRuntime",
    "Outcome",
    "SettleEarly",
    "Verdict",
    "Watch",
]
