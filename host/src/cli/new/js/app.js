// `{{name}}`: a Switchboard plugin.
//
// It answers each `greeting.requested` event, whose data is JSON with a `name`,
// with one `greeting.sent` event: `{"greeting": "Hello, <name>!"}`. It ignores
// every other kind. A `greeting.requested` event without a name is rejected (it
// goes to the dead-letter queue with the reason). The greeting word comes from the
// plugin's `greeting` configuration value in router.toml, "Hello" by default.
//
// The world's imports are modules named after their WIT interfaces; `handle`
// returns the outputs, and throws `{ tag: "reject" | "retry", val: reason }` to fail.
import { get } from "switchboard:plugin/config@0.1.1";
import { log } from "switchboard:plugin/logging@0.1.1";

export function handle(event) {
  if (event.kind !== "greeting.requested") {
    return [];
  }
  let data;
  try {
    data = JSON.parse(new TextDecoder().decode(event.data));
  } catch (err) {
    throw { tag: "reject", val: `event ${event.id}: data is not JSON: ${err.message}` };
  }
  const name = data?.name;
  if (typeof name !== "string" || name === "") {
    throw { tag: "reject", val: `event ${event.id}: no name to greet` };
  }
  const greeting = get("greeting") || "Hello";
  log("info", `greeting ${name}`);

  return [
    {
      kind: "greeting.sent",
      contentType: "application/json",
      data: new TextEncoder().encode(JSON.stringify({ greeting: `${greeting}, ${name}!` })),
      exchange: undefined,
      headers: [],
    },
  ];
}
