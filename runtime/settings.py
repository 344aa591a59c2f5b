"""Process-wide runtime settings: one object, built by the CLI from flags and environment."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    # Lua executes on the event-loop thread, so a handler that never yields stalls every other
    # handler: the budget bounds one invocation (about 0.1-0.5 s of pure Lua on this hardware).
    max_instructions: int = 50_000_000
    # One Lua state serves every handler in the process; past this, allocations fail in Lua.
    lua_max_memory: int = 512 * 1024 * 1024
    # Grace period for in-flight handlers on SIGTERM before their messages are requeued.
    shutdown_timeout: float = 30.0
    # A handler running this long in Lua without returning (a C call that does not, since the
    # budget cannot stop it) has its worker process killed and replaced by the supervisor.
    hard_timeout: float = 60.0
