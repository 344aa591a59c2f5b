"""math.random and math.randomseed are each function's own: a handler that seeds the generator
cannot make another function's numbers known (nor read them), and the generator behaves as
Lua's own (xoshiro256**) for every form of call."""

from __future__ import annotations

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
          local unit, ranged, one, wide = math.random(), math.random(6), math.random(3, 3),
            math.random(math.mininteger, math.maxinteger)
          local big = math.random(-1, math.maxinteger)
          queue.publish("out", {
            unit = 0 <= unit and unit < 1 and math.type(unit) == "float",
            ranged = 1 <= ranged and ranged <= 6 and math.type(ranged) == "integer",
            one = one, wide = math.type(wide), big = big >= -1,
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
    assert result["big"] is True
    assert "interval is empty" in result["empty"]
    assert "number has no integer representation" in result["fraction"]
    assert result["seeds"] == [5, 6]
