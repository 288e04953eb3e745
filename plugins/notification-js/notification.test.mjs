// Unit tests for notification.js under plain Node: `node --test plugins/notification-js/`.
//
// The plugin imports the host's WIT interfaces; here they resolve to a stub whose
// config is `globalThis.config` (a Map) and whose log goes to `globalThis.logs`.

import { register } from "node:module";
import { test } from "node:test";
import assert from "node:assert/strict";

const stub =
  "export const get = (key) => globalThis.config.get(key);" +
  "export const log = (level, message) => globalThis.logs.push([level, message]);";
register(
  "data:text/javascript," +
    encodeURIComponent(`export async function resolve(specifier, context, next) {
      return specifier.startsWith("switchboard:plugin/")
        ? { url: "data:text/javascript,${encodeURIComponent(stub)}", shortCircuit: true }
        : next(specifier, context);
    }`),
);
const { handle, parseJson, toJson, trim, BUILT_IN_KINDS, EMAIL, SMS } = await import(
  "./notification.js"
);

function run(kind, data, config = {}) {
  globalThis.config = new Map(Object.entries(config));
  globalThis.logs = [];
  const bytes = new TextEncoder().encode(typeof data === "string" ? data : JSON.stringify(data));
  const event = { id: "evt-1", kind, source: "shop", time: "t", data: bytes, headers: [] };
  return handle(event).map((out) => ({ ...out, text: new TextDecoder().decode(out.data) }));
}

function rejection(kind, data, config) {
  try {
    run(kind, data, config);
  } catch (failure) {
    assert.equal(failure.tag, "reject");
    return failure.val;
  }
  assert.fail("expected a reject");
}

test("payment.success emails the customer with the default template", () => {
  const [email, ...rest] = run("payment.success", {
    payment_id: "p-1",
    amount: 42.5,
    currency: "EUR",
    customer: { email: "ada@example.com" },
  });
  assert.equal(rest.length, 0, "no phone, no SMS");
  assert.equal(email.kind, EMAIL);
  assert.equal(email.contentType, "application/json");
  assert.equal(
    email.text,
    '{"body":"We received your payment of 42.5 EUR. Reference: p-1.",' +
      '"recipient":"ada@example.com","subject":"Payment received","template_id":"payment.success"}',
  );
  assert.deepEqual(globalThis.logs, [["debug", "1 notification(s) for payment.success"]]);
});

test("a phone adds an SMS; only a phone gets only the SMS", () => {
  const outputs = run("order.shipped", { order_id: "o-7", user: { email: "b@x", phone: "+1" } });
  assert.deepEqual(outputs.map((o) => o.kind), [EMAIL, SMS]);
  assert.equal(
    outputs[1].text,
    '{"body":"Order o-7 shipped. Tracking: n/a.","recipient":"+1","template_id":"order.shipped"}',
  );
  assert.deepEqual(run("user.created", { phone: "+1" }).map((o) => o.kind), [SMS]);
});

test("every built-in kind notifies without config; other kinds do not", () => {
  for (const kind of BUILT_IN_KINDS) {
    assert.equal(run(kind, { email: "x@x", phone: "+1" }).length, 2, kind);
  }
  assert.deepEqual(run("inventory.low", "not json"), []);
  assert.deepEqual(run("constructor", { email: "x@x" }), []);
});

test("recipients are looked up in order, trimmed as Rust trims", () => {
  const recipient = (data) => JSON.parse(run("order.created", data)[0].text).recipient;
  assert.equal(recipient({ email: " ", recipient: { email: 5 }, to: "t@x" }), "t@x");
  assert.equal(recipient({ email: "\u0085a@x\u0085" }), "a@x");
  assert.equal(recipient({ email: "\ufeffa@x" }), "\ufeffa@x");
  assert.equal(trim("\u3000\u0085x\u2029"), "x");
  assert.equal(trim("\u001cx\ufeff"), "\u001cx\ufeff");
});

test("no recipient and invalid data are rejects", () => {
  assert.equal(
    rejection("payment.failed", { customer: { id: 1 } }),
    "no recipient: payment.failed event evt-1 has no email at email, recipient.email, " +
      "customer.email, user.email, buyer.email, to (nor a phone at phone, customer.phone, " +
      "user.phone, buyer.phone)",
  );
  assert.match(rejection("order.created", "<xml/>"), /^order.created event evt-1: data is not the expected JSON: /);
});

test("config overrides templates and adds kinds", () => {
  const config = {
    "payment.success.body": "{{event.kind}} {{amount}} {{ items.+1 }} {{x|none}}",
    "payment.success.template_id": "v2",
    "payment.success.sms": "\u0085",
    "invoice.overdue.body": "Invoice {{id}}",
  };
  const [email, ...rest] = run("payment.success", '{"email":"a@x","phone":"+1","amount":1e16,"items":[1,2.0]}', config);
  assert.equal(rest.length, 0, "a blank sms template turns SMS off");
  assert.equal(JSON.parse(email.text).body, "payment.success 1e+16 2.0 none");
  assert.equal(JSON.parse(run("invoice.overdue", { id: 7, to: "c@x" }, config)[0].text).subject, "invoice.overdue");
});

test("JSON is read and written as serde_json does", () => {
  const roundTrip = (text) => toJson(parseJson(new TextEncoder().encode(text)));
  assert.equal(roundTrip('{"b":1,"a":[1.0,-0,1e15,1e16,0.00001,1e-6,18446744073709551615]}'),
    '{"a":[1.0,-0.0,1000000000000000.0,1e+16,0.00001,1e-6,18446744073709551615],"b":1}');
  assert.equal(roundTrip('[18446744073709551616,-9223372036854775809]'), "[1.8446744073709552e+19,-9.223372036854776e+18]");
  assert.equal(roundTrip('{"\\ud83d\\ude00":1,"\\uffff":2,"k":"\\u001f\\u007f","k":"\\""}'),
    '{"k":"\\"","\uffff":2,"\u{1f600}":1}');
  for (const bad of ["\ufeff1", "01", "1.", "1e400", '"\\ud800"', '"\t"', "[1,]", "[".repeat(128) + "]".repeat(128)]) {
    assert.throws(() => parseJson(new TextEncoder().encode(bad)), Error, bad);
  }
  assert.equal(roundTrip("[".repeat(127) + "]".repeat(127)).length, 254);
});
