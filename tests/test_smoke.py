from conftest import AppFactory


async def test_publish_roundtrip(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local msg = queue.message()
          local headers = {priority = msg:header("priority")}
          assert(queue.publish("out", {echo = p, id = msg:id()}, headers))
        end
        """,
        [({"n": 1, "xs": [1, 2.5, "é"]}, {"priority": "high"})],
    )
    assert len(out) == 1
    assert out[0].data["echo"] == {"n": 1, "xs": [1, 2.5, "é"]}
    assert out[0].headers == {"priority": "high"}
    assert app.consumer.stats.acked == 1
