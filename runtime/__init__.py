"""luaq runtime: runs Lua queue handlers on asyncio, on the memory driver or a broker."""

from importlib.metadata import version

__version__ = version("luaq")
