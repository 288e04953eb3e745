"""`{{name}}`: a Switchboard plugin.

It answers each `greeting.requested` event, whose data is JSON with a `name`, with
one `greeting.sent` event: `{"greeting": "Hello, <name>!"}`. It ignores every other
kind. A `greeting.requested` event without a name is rejected (it goes to the
dead-letter queue with the reason). The greeting word comes from the plugin's
`greeting` configuration value in router.toml, "Hello" by default.

`wit_world` is generated from wit/ when the component is built (`make`); run
`componentize-py -d wit -w handler bindings .` to have it beside you for an editor.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, logging, types


class WitWorld(wit_world.WitWorld):
    def handle(self, event: types.Event) -> list[types.Output]:
        if event.kind != "greeting.requested":
            return []
        try:
            data = json.loads(event.data)
        except ValueError as err:
            raise Err(types.Failure_Reject(f"event {event.id}: data is not JSON: {err}"))
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            raise Err(types.Failure_Reject(f"event {event.id}: no name to greet"))
        greeting = config.get("greeting") or "Hello"
        logging.log(logging.Level.INFO, f"greeting {name}")

        data = json.dumps({"greeting": f"{greeting}, {name}!"}, ensure_ascii=False)
        return [
            types.Output(
                kind="greeting.sent",
                content_type="application/json",
                data=data.encode(),
                exchange=None,
                headers=[],
            )
        ]
