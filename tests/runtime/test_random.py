"""math.random and math.randomseed are each function's own: a handler that seeds the generator
cannot make another function's numbers known (nor read them), and the generator behaves as
Lua's own (xoshiro256**) for every form of call."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from typing import Any

from conftest import AppFactory

DRAW = "math.random(1, 1000000000)"


async def test_a_seed_set_by_one_function_does_not_reach_another(apps: AppFactory) -> None:
    seeder = f"""
    function handle(p)
      math.randomseed(p.seed)
      local values = {{}}
      for i = 1, p.draws do values[i] = {DRAW} end
      queue.publish("out", {{who = "seeder", values = values}})
    end
    """
    other: dict[str, Any] = {
        "name": "other_fn",
        "kind": "function.lua",
        "method": "handle",
        "source": f'function handle(p) queue.publish("out", {{who = "other", value = {DRAW}}}) end',
    }
    app = await apps.start(
        seeder,
        extra_entries=[
            other,
            {"id": "other_worker", "kind": "queue.consumer", "queue": "other", "func": "other_fn"},
        ],
    )
    await app.publish("in", {"seed": 7, "draws": 1})
    await app.idle()
    await app.publish("other", {})  # with one generator, the second number of seed 7
    await app.idle()
    await app.publish("in", {"seed": 7, "draws": 2})
    await app.idle()
    first, drawn, again = (m.data for m in await app.drain("out"))
    assert first["who"] == again["who"] == "seeder"
    assert drawn["who"] == "other"
    assert again["values"][0] == first["values"][0]  # a seed still makes a function repeatable
    assert drawn["value"] != again["values"][1]


async def test_the_generator_takes_every_form_of_call_as_lua_does(apps: AppFactory) -> None:
    _, out = await apps.run(
        """
        local function refused(...)
          local ok, err = pcall(math.random, ...)
          return not ok and err or "accepted"
        end
        function handle(p)
          local unit, ranged, one, wide, bits = math.random(), math.random(6), math.random(3, 3),
            math.random(math.mininteger, math.maxinteger), math.random(0)
          local big = math.random(-1, math.maxinteger)
          queue.publish("out", {
            unit = 0 <= unit and unit < 1 and math.type(unit) == "float",
            ranged = 1 <= ranged and ranged <= 6 and math.type(ranged) == "integer",
            one = one, wide = math.type(wide), big = big >= -1, bits = math.type(bits),
            empty = refused(2, 1), fraction = refused(1.5),
            seeds = {math.randomseed(5, 6)},
          })
        end
        """,
        ["go"],
    )
    (result,) = (m.data for m in out)
    assert result["unit"] is True
    assert result["ranged"] is True
    assert result["one"] == 3
    assert result["wide"] == "integer"
    assert result["bits"] == "integer"
    assert result["big"] is True
    assert "interval is empty" in result["empty"]
    assert "number has no integer representation" in result["fraction"]
    assert result["seeds"] == [5, 6]


# -- the attack a review made: the process generator's state from the seeds randomseed() returns

M64 = 2**64 - 1
Ops = tuple[Callable[[Any, Any], Any], Callable[[Any, int], Any], Callable[[Any, int], Any]]
NUMBERS: Ops = (
    operator.xor,
    lambda a, n: (a << n) & M64,
    lambda a, n: ((a << n) | (a >> (64 - n))) & M64,
)
# a word as 64 masks over the 256 bits of an unknown state: bit i of the word is their parity
MASKS: Ops = (
    lambda a, b: [x ^ y for x, y in zip(a, b, strict=True)],
    lambda a, n: [0] * n + a[: 64 - n],
    lambda a, n: a[64 - n :] + a[: 64 - n],
)


def step(state: list[Any], ops: Ops) -> list[Any]:
    """xoshiro256**'s state transition (Lua 5.4's, and bridge.lua's): linear over GF(2)."""
    xor, shl, rotl = ops
    s0, s1, s2, s3 = state
    s2, s3 = xor(s2, s0), xor(s3, s1)
    s1, s0 = xor(s1, s2), xor(s0, s3)
    return [s0, s1, xor(s2, shl(state[1], 17)), rotl(s3, 45)]


def output(state: list[int]) -> int:
    return (NUMBERS[2]((state[1] * 5) & M64, 7) * 9) & M64


def outputs_before(observed: list[int], back: int) -> list[int]:
    """The `back` outputs a generator gave before the four consecutive `observed` ones, had
    xoshiro256** given them all: its output is an invertible function of s1 alone, so four of
    them are 256 linear equations in its 256 bits of state."""
    symbolic = [[1 << (64 * w + i) for i in range(64)] for w in range(4)]
    for _ in range(back):
        symbolic = step(symbolic, MASKS)
    pivots: dict[int, tuple[int, int]] = {}
    for out in observed:
        word = NUMBERS[2]((out * pow(9, -1, 2**64)) & M64, 57) * pow(5, -1, 2**64) & M64
        for i, mask in enumerate(symbolic[1]):
            bit = word >> i & 1
            while mask and (pivot := mask.bit_length() - 1) in pivots:
                mask, bit = mask ^ pivots[pivot][0], bit ^ pivots[pivot][1]
            if mask:
                pivots[pivot] = (mask, bit)
        symbolic = step(symbolic, MASKS)
    solution = 0
    for pivot in sorted(pivots):
        mask, bit = pivots[pivot]
        solution |= (bit ^ (mask & ~(1 << pivot) & solution).bit_count() & 1) << pivot
    state, given = [solution >> 64 * w & M64 for w in range(4)], []
    for _ in range(back):
        given.append(output(state))
        state = step(state, NUMBERS)
    return given


def draws_of(n1: int, n2: int, count: int) -> list[int]:
    """math.random(1, 1000000000) `count` times after math.randomseed(n1, n2), as bridge.lua."""
    state = [n1 & M64, 0xFF, n2 & M64, 0]
    for _ in range(16):
        state = step(state, NUMBERS)
    draws = []
    for _ in range(count):
        draws.append(1 + (output(state) >> 1) % 1_000_000_000)
        state = step(state, NUMBERS)
    return draws


async def test_the_seeds_one_function_is_given_tell_nothing_of_anothers_numbers(
    apps: AppFactory,
) -> None:
    """Every function was seeded from one generator of the process, and math.randomseed()
    returned its next two outputs: three calls gave its state, and with it the seeds, and the
    numbers, of every other function (a review did exactly this). Seeds now come from the
    operating system."""
    victim = f"""
    function handle()
      local d = {{}}
      for i = 1, 5 do d[i] = {DRAW} end
      queue.publish("out", d)
    end
    """
    app = await apps.start(
        """
        function handle()
          local seeds = {}
          for i = 1, 2 do
            local a, b = math.randomseed()
            seeds[#seeds + 1] = a
            seeds[#seeds + 1] = b
          end
          queue.publish("out", seeds)
        end
        """,
        extra_entries=[
            {"name": "victim_fn", "kind": "function.lua", "method": "handle", "source": victim},
            {"id": "victim", "kind": "queue.consumer", "queue": "other", "func": "victim_fn"},
        ],
    )
    await app.publish("in", {})
    await app.idle()
    await app.publish("other", {})
    await app.idle()
    seeds, drawn = (m.data for m in await app.drain("out"))
    earlier = outputs_before([seed & M64 for seed in seeds], 8)
    guesses = [draws_of(*pair, 5) for pair in itertools.pairwise(earlier)]
    assert drawn not in guesses
