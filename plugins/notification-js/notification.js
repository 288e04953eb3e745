/**
 * `notification`: turns business events into notification requests.
 *
 * The JavaScript version of the Rust `notification` plugin
 * (plugins/notification): for every event and configuration it produces the
 * same outputs, byte for byte, and the same failures.
 *
 * For each event of a kind it knows, it renders templates against the event's
 * JSON data and emits a `notification.email` and, when the data carries a phone
 * number, a `notification.sms`. A delivery service consumes those; this plugin
 * never talks to a mail or SMS provider itself.
 *
 * # Input
 *
 * Kinds handled out of the box: `payment.success`, `payment.failed`,
 * `bill.created`, `order.created`, `order.shipped`, `user.created`,
 * `ticket.purchased`, `listing.sold`, and the billing plugin's `bill.paid` and
 * `bill.payment_failed` (which carry the bill's `customer`); also any other kind
 * for which config has a `<kind>.body` template. Other kinds: no outputs. Data
 * must be JSON, else the event is rejected.
 *
 * The email recipient is the first non-empty string among the data's
 * `email`, `recipient.email`, `customer.email`, `user.email`, `buyer.email`, `to`;
 * the phone number among `phone`, `customer.phone`, `user.phone`, `buyer.phone`.
 * An event with neither is rejected (`no recipient: ...`); one with only a phone
 * gets only the SMS.
 *
 * # Output
 *
 * - `notification.email`: `{"recipient", "template_id", "subject", "body"}`
 * - `notification.sms`: `{"recipient", "template_id", "body"}` (recipient = phone)
 *
 * The data is compact JSON with the keys in sorted order, as serde_json writes it.
 *
 * # Config (all optional)
 *
 * - `<kind>.subject`, `<kind>.body`: the email templates;
 * - `<kind>.sms`: the SMS template; set it to `""` to send no SMS for that kind;
 * - `<kind>.template_id`: the outputs' `template_id` (default: the kind).
 *
 * Templates use `{{path.to.field}}` into the data, `{{event.id}}`,
 * `{{event.kind}}` and `{{path|fallback}}`; see `render`.
 *
 * The plugin keeps no state: a redelivered event renders the same outputs.
 *
 * # Why the JSON code is hand-written
 *
 * `JSON.parse` and `JSON.stringify` differ from serde_json, which the Rust
 * plugin uses, in ways that show in the outputs: they accept lone surrogate
 * escapes and nesting of any depth, lose integers above 2^53, print numbers in
 * another layout (`1.0` vs `1`, `1e+16` vs `10000000000000000`) and keep keys in
 * insertion order. So this module parses and writes JSON itself, the way
 * serde_json does. Parsed values are:
 *
 * - `null`, booleans and strings as themselves;
 * - integers (no fraction, no exponent) that fit u64, or i64 when negative, as
 *   `bigint`; every other number as a `number` (`-0` is the float -0.0);
 * - arrays as `Array`, objects as `Map` (the last of duplicate keys wins).
 */

import { get as configGet } from "switchboard:plugin/config@0.1.1";
import { log } from "switchboard:plugin/logging@0.1.1";

// Strings from the host (event fields, config values) must arrive exactly as
// sent. componentize-js 0.23 lifts them with a default `new TextDecoder()`,
// which drops a leading U+FEFF (byte order mark): an event id, a kind or a
// template starting with one would differ from what the Rust plugin sees. So
// non-fatal UTF-8 decoders keep the mark; this module itself only decodes with
// `ignoreBOM` set, where nothing changes.
{
  const keepBom = new TextDecoder("utf-8", { ignoreBOM: true });
  const { decode } = TextDecoder.prototype;
  TextDecoder.prototype.decode = function (input, options) {
    return this.ignoreBOM || this.fatal || this.encoding !== "utf-8" || options?.stream
      ? decode.call(this, input, options)
      : keepBom.decode(input);
  };
}

/** Where the email address is looked for, in this order. */
export const EMAIL_PATHS = [
  "email",
  "recipient.email",
  "customer.email",
  "user.email",
  "buyer.email",
  "to",
];

/** Where the phone number is looked for, in this order. */
export const PHONE_PATHS = ["phone", "customer.phone", "user.phone", "buyer.phone"];

/** Kind of the email output. */
export const EMAIL = "notification.email";
/** Kind of the SMS output. */
export const SMS = "notification.sms";

/**
 * Built-in `[subject, body, sms]` templates: the kinds handled with no
 * configuration at all. They only use fields the usual producers send, with
 * fallbacks where a field is often missing.
 */
const DEFAULT_TEMPLATES = new Map([
  [
    "payment.success",
    [
      "Payment received",
      "We received your payment of {{amount}} {{currency}}. Reference: {{payment_id}}.",
      "Payment of {{amount}} {{currency}} received. Ref {{payment_id}}.",
    ],
  ],
  [
    "payment.failed",
    [
      "Your payment did not go through",
      "Your payment of {{amount}} {{currency}} failed: {{reason|no reason given}}. " +
        "Please try again or use another payment method. Reference: {{payment_id}}.",
      "Payment of {{amount}} {{currency}} failed: {{reason|no reason given}}.",
    ],
  ],
  [
    "bill.created",
    [
      "New bill {{bill_id}}",
      "Your bill {{bill_id}} for {{amount}} {{currency}} is ready.",
      "New bill {{bill_id}}: {{amount}} {{currency}}.",
    ],
  ],
  [
    "order.created",
    [
      "Order {{order_id}} confirmed",
      "Thank you for your order {{order_id}}. We will let you know when it ships.",
      "Order {{order_id}} confirmed.",
    ],
  ],
  [
    "order.shipped",
    [
      "Order {{order_id}} has shipped",
      "Your order {{order_id}} is on its way. " +
        "Tracking number: {{tracking_number|not available yet}}.",
      "Order {{order_id}} shipped. Tracking: {{tracking_number|n/a}}.",
    ],
  ],
  [
    "user.created",
    [
      "Welcome, {{name|there}}!",
      "Hi {{name|there}}, your account is ready. We are glad to have you.",
      "Welcome, {{name|there}}! Your account is ready.",
    ],
  ],
  [
    "ticket.purchased",
    [
      "Your tickets for {{event_name|your event}}",
      "Your tickets for {{event_name|your event}} are confirmed. " +
        "Ticket: {{ticket_id}}. Quantity: {{quantity|1}}.",
      "Tickets for {{event_name|your event}} confirmed. Ticket {{ticket_id}}.",
    ],
  ],
  [
    "listing.sold",
    [
      "Your listing {{listing_id}} sold",
      "Good news: your listing {{listing_id}} sold for {{price|the asking price}}.",
      "Your listing {{listing_id}} sold.",
    ],
  ],
  [
    "bill.paid",
    [
      "Bill {{bill_id}} is paid",
      "Thank you: bill {{bill_id}} is paid ({{amount}} {{currency}}). " +
        "Payment reference: {{payment_id}}.",
      "Bill {{bill_id}} paid: {{amount}} {{currency}}.",
    ],
  ],
  [
    "bill.payment_failed",
    [
      "Payment for bill {{bill_id}} failed",
      "We could not collect {{amount}} {{currency}} for bill {{bill_id}}: " +
        "{{reason|no reason given}}. Please update your payment method.",
      "Payment for bill {{bill_id}} failed: {{reason|no reason given}}.",
    ],
  ],
]);

/** The kinds handled with no configuration at all. */
export const BUILT_IN_KINDS = [...DEFAULT_TEMPLATES.keys()];

/**
 * The `handle` export: the outputs for one event.
 *
 * Returns the outputs (possibly none); throws a `failure` variant
 * (`{ tag: "reject", val: message }`) when the event can never be handled.
 */
export function handle(event) {
  const templates = templatesFor(event.kind, configGet);
  if (templates === undefined) {
    return [];
  }
  let data;
  try {
    data = parseJson(event.data);
  } catch (err) {
    throw reject(
      `${event.kind} event ${event.id}: data is not the expected JSON: ${err.message}`,
    );
  }
  return notify(event, data, templates);
}

/** A `failure::reject(message)`, to throw from `handle`. */
function reject(message) {
  return { tag: "reject", val: message };
}

/** The outputs for `event` (with parsed `data`) rendered from `templates`. */
export function notify(event, data, templates) {
  const email = firstString(data, EMAIL_PATHS);
  const phone = templates.sms === undefined ? undefined : firstString(data, PHONE_PATHS);
  if (email === undefined && phone === undefined) {
    throw reject(
      `no recipient: ${event.kind} event ${event.id} has no email at ` +
        `${EMAIL_PATHS.join(", ")} (nor a phone at ${PHONE_PATHS.join(", ")})`,
    );
  }

  const outputs = [];
  if (email !== undefined) {
    outputs.push(
      jsonOutput(EMAIL, {
        recipient: email,
        template_id: templates.templateId,
        subject: render(templates.subject, event, data),
        body: render(templates.body, event, data),
      }),
    );
  }
  if (phone !== undefined) {
    outputs.push(
      jsonOutput(SMS, {
        recipient: phone,
        template_id: templates.templateId,
        body: render(templates.sms, event, data),
      }),
    );
  }
  log("debug", `${outputs.length} notification(s) for ${event.kind}`);
  return outputs;
}

/** An output whose data is the JSON object with the (string) `fields`. */
function jsonOutput(kind, fields) {
  return {
    kind,
    contentType: "application/json",
    data: new TextEncoder().encode(toJson(new Map(Object.entries(fields)))),
    exchange: undefined,
    headers: [],
  };
}

/** The first non-empty string (trimmed) found at one of `paths`. */
function firstString(data, paths) {
  for (const path of paths) {
    const value = lookup(data, path);
    if (typeof value === "string") {
      const trimmed = trim(value);
      if (trimmed !== "") {
        return trimmed;
      }
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// Templates

/**
 * The templates for `kind` after config overrides, or `undefined` when this
 * plugin does not notify on it: built-in kinds always have templates (config
 * `<kind>.subject`, `.body`, `.sms`, `.template_id` override the defaults); any
 * other kind only when config gives it a `<kind>.body`.
 *
 * `config(key)` returns the configured string or `undefined`. The result is
 * `{ templateId, subject, body, sms }`, `sms` being `undefined` when SMS is off
 * for this kind (its template is blank).
 */
export function templatesFor(kind, config) {
  const get = (field) => config(`${kind}.${field}`);
  const defaults = DEFAULT_TEMPLATES.get(kind);
  let subject, body, sms;
  if (defaults !== undefined) {
    subject = get("subject") ?? defaults[0];
    body = get("body") ?? defaults[1];
    sms = get("sms") ?? defaults[2];
  } else {
    subject = get("subject") ?? "{{event.kind}}";
    body = get("body");
    if (body === undefined) {
      return undefined;
    }
    sms = get("sms") ?? "";
  }
  return {
    templateId: get("template_id") ?? kind,
    subject,
    body,
    sms: trim(sms) === "" ? undefined : sms,
  };
}

/**
 * Renders `template`, replacing each `{{placeholder}}`:
 *
 * - `{{event.id}}`, `{{event.kind}}`, `{{event.source}}`, `{{event.time}}`,
 *   `{{event.tenant_id}}`, `{{event.correlation_id}}`: the event's own fields;
 * - `{{a.b.c}}`: a dotted path into the event's JSON data (objects by key,
 *   arrays by index). Strings, numbers and booleans render plainly, objects and
 *   arrays as compact JSON;
 * - `{{path|fallback}}`: the fallback text when the path is missing, null or an
 *   empty string. Without a fallback, such a placeholder renders as nothing.
 *
 * The path is trimmed, the fallback is not (it starts after the first `|`).
 * Text is not escaped (the outputs are plain text); an unclosed `{{` stays as is.
 */
export function render(template, event, data) {
  let out = "";
  let rest = template;
  let start;
  while ((start = rest.indexOf("{{")) !== -1) {
    out += rest.slice(0, start);
    const after = rest.slice(start + 2);
    const end = after.indexOf("}}");
    if (end === -1) {
      return out + rest.slice(start);
    }
    const placeholder = after.slice(0, end);
    const bar = placeholder.indexOf("|");
    const path = trim(bar === -1 ? placeholder : placeholder.slice(0, bar));
    const fallback = bar === -1 ? "" : placeholder.slice(bar + 1);
    const value = resolve(path, event, data);
    out += value === undefined || value === "" ? fallback : value;
    rest = after.slice(end + 2);
  }
  return out + rest;
}

/** The text a placeholder's (trimmed) `path` stands for, if any. */
function resolve(path, event, data) {
  if (path.startsWith("event.")) {
    switch (path.slice("event.".length)) {
      case "id":
        return event.id;
      case "kind":
        return event.kind;
      case "source":
        return event.source;
      case "time":
        return event.time;
      case "tenant_id":
        return event.tenantId ?? undefined;
      case "correlation_id":
        return event.correlationId ?? undefined;
      default:
        return undefined;
    }
  }
  return plain(lookup(data, path));
}

/**
 * The value at dotted `path` in `data`, or `undefined`. Objects are searched by
 * exact key; arrays by index, where a segment is an index if Rust's
 * `str::parse::<usize>` accepts it (digits, an optional leading `+`, leading
 * zeros allowed).
 */
export function lookup(data, path) {
  let value = data;
  for (const segment of path.split(".")) {
    if (value instanceof Map) {
      value = value.get(segment);
    } else if (Array.isArray(value) && /^\+?[0-9]+$/.test(segment)) {
      // An index too large to be exact as a number is past the end anyway.
      value = value[Number(segment)];
    } else {
      return undefined;
    }
    if (value === undefined) {
      return undefined;
    }
  }
  return value;
}

/** A data value as placeholder text; `undefined` for null or a missing value. */
function plain(value) {
  switch (typeof value) {
    case "undefined":
      return undefined;
    case "string":
      return value;
    case "boolean":
    case "bigint":
      return String(value);
    case "number":
      return formatFloat(value);
    default:
      return value === null ? undefined : toJson(value);
  }
}

/**
 * Rust's `char::is_whitespace`, which `str::trim` uses. It differs from
 * `String.prototype.trim`: U+0085 is whitespace, U+FEFF is not.
 */
function isWhitespace(code) {
  return (
    (code >= 0x09 && code <= 0x0d) ||
    code === 0x20 ||
    code === 0x85 ||
    code === 0xa0 ||
    code === 0x1680 ||
    (code >= 0x2000 && code <= 0x200a) ||
    code === 0x2028 ||
    code === 0x2029 ||
    code === 0x202f ||
    code === 0x205f ||
    code === 0x3000
  );
}

/** `s` without leading and trailing whitespace, as Rust's `str::trim`. */
export function trim(s) {
  let start = 0;
  let end = s.length;
  while (start < end && isWhitespace(s.charCodeAt(start))) {
    start++;
  }
  while (end > start && isWhitespace(s.charCodeAt(end - 1))) {
    end--;
  }
  return s.slice(start, end);
}

// ---------------------------------------------------------------------------
// JSON, as serde_json reads and writes it

/** Objects and arrays nested deeper than this are an error, as in serde_json. */
const MAX_DEPTH = 127;

const LARGEST_U64 = 2n ** 64n - 1n;
const SMALLEST_I64 = -(2n ** 63n);

/** A JSON number's text: sticky, to match at the parser's position. */
const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;

/** The one-character escapes, and what they stand for. */
const UNESCAPE = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" };

/**
 * Parses `bytes` as one JSON text, strictly as serde_json does (see the module
 * docs for the values it returns). Throws an `Error` on anything else: invalid
 * UTF-8, a byte order mark, unpaired surrogate escapes, control characters in
 * strings, numbers outside the JSON grammar or too large for a float, nesting
 * deeper than 127, trailing characters.
 */
export function parseJson(bytes) {
  let text;
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(bytes);
  } catch {
    throw new Error("invalid UTF-8");
  }
  return new Parser(text).parseDocument();
}

class Parser {
  constructor(text) {
    this.text = text;
    this.pos = 0;
    this.depth = 0;
  }

  fail(what) {
    throw new Error(`${what} at character ${this.pos}`);
  }

  /** The one value the text holds, with nothing but whitespace around it. */
  parseDocument() {
    const value = this.parseValue();
    this.skipWhitespace();
    if (this.pos < this.text.length) {
      this.fail("trailing characters");
    }
    return value;
  }

  skipWhitespace() {
    const { text } = this;
    for (;;) {
      const c = text[this.pos];
      if (c !== " " && c !== "\n" && c !== "\t" && c !== "\r") {
        return;
      }
      this.pos++;
    }
  }

  /** Consumes `c` (after whitespace) if it is next; true if it was. */
  eat(c) {
    this.skipWhitespace();
    if (this.text[this.pos] === c) {
      this.pos++;
      return true;
    }
    return false;
  }

  expect(c) {
    if (!this.eat(c)) {
      this.fail(`expected \`${c}\``);
    }
  }

  parseValue() {
    this.skipWhitespace();
    switch (this.text[this.pos]) {
      case "{":
        return this.parseObject();
      case "[":
        return this.parseArray();
      case '"':
        return this.parseString();
      case "t":
        return this.parseLiteral("true", true);
      case "f":
        return this.parseLiteral("false", false);
      case "n":
        return this.parseLiteral("null", null);
      case undefined:
        return this.fail("unexpected end of input");
      default:
        return this.parseNumber();
    }
  }

  parseLiteral(word, value) {
    if (!this.text.startsWith(word, this.pos)) {
      this.fail("expected a value");
    }
    this.pos += word.length;
    return value;
  }

  enter() {
    if (++this.depth > MAX_DEPTH) {
      this.fail("recursion limit exceeded");
    }
    this.pos++;
  }

  parseArray() {
    this.enter();
    const items = [];
    if (!this.eat("]")) {
      do {
        items.push(this.parseValue());
      } while (this.eat(","));
      this.expect("]");
    }
    this.depth--;
    return items;
  }

  parseObject() {
    this.enter();
    const map = new Map();
    if (!this.eat("}")) {
      do {
        this.skipWhitespace();
        if (this.text[this.pos] !== '"') {
          this.fail("expected a key");
        }
        const key = this.parseString();
        this.expect(":");
        map.set(key, this.parseValue());
      } while (this.eat(","));
      this.expect("}");
    }
    this.depth--;
    return map;
  }

  parseString() {
    const { text } = this;
    let out = "";
    let from = ++this.pos; // after the opening quote
    for (;;) {
      const code = text.charCodeAt(this.pos);
      if (code === 0x22 /* " */) {
        out += text.slice(from, this.pos++);
        return out;
      } else if (code === 0x5c /* \ */) {
        out += text.slice(from, this.pos++);
        out += this.parseEscape();
        from = this.pos;
      } else if (code < 0x20) {
        this.fail("control character in string");
      } else if (Number.isNaN(code)) {
        this.fail("unterminated string");
      } else {
        this.pos++;
      }
    }
  }

  /** The character(s) an escape stands for; `pos` is just after the `\`. */
  parseEscape() {
    const c = this.text[this.pos++];
    if (c === "u") {
      const unit = this.parseHex4();
      if (unit >= 0xdc00 && unit <= 0xdfff) {
        this.fail("lone trailing surrogate in escape");
      }
      if (unit < 0xd800 || unit > 0xdbff) {
        return String.fromCharCode(unit);
      }
      // A leading surrogate must be followed by an escaped trailing one.
      if (!this.text.startsWith("\\u", this.pos)) {
        this.fail("lone leading surrogate in escape");
      }
      this.pos += 2;
      const trail = this.parseHex4();
      if (trail < 0xdc00 || trail > 0xdfff) {
        this.fail("lone leading surrogate in escape");
      }
      return String.fromCharCode(unit, trail);
    }
    if (!Object.hasOwn(UNESCAPE, c)) {
      this.fail("invalid escape");
    }
    return UNESCAPE[c];
  }

  parseHex4() {
    const hex = this.text.slice(this.pos, this.pos + 4);
    if (!/^[0-9a-fA-F]{4}$/.test(hex)) {
      this.fail("invalid \\u escape");
    }
    this.pos += 4;
    return parseInt(hex, 16);
  }

  parseNumber() {
    NUMBER.lastIndex = this.pos;
    const match = NUMBER.exec(this.text);
    if (match === null) {
      this.fail("expected a value");
    }
    const [literal, fraction, exponent] = match;
    this.pos += literal.length;
    if (fraction === undefined && exponent === undefined && literal !== "-0") {
      const integer = BigInt(literal);
      if (integer >= SMALLEST_I64 && integer <= LARGEST_U64) {
        return integer;
      }
    }
    // Correctly rounded, as serde_json with `float_roundtrip` does.
    const float = Number(literal);
    if (!Number.isFinite(float)) {
      this.fail("number out of range");
    }
    return float;
  }
}

/**
 * `value` as compact JSON text, as `serde_json::to_string` writes it: no
 * spaces, object keys sorted, numbers laid out as in `formatFloat`.
 */
export function toJson(value) {
  switch (typeof value) {
    case "string":
      return quote(value);
    case "boolean":
    case "bigint":
      return String(value);
    case "number":
      return formatFloat(value);
  }
  if (value === null) {
    return "null";
  }
  if (Array.isArray(value)) {
    return `[${value.map(toJson).join(",")}]`;
  }
  const keys = [...value.keys()].sort(compareCodePoints);
  return `{${keys.map((key) => `${quote(key)}:${toJson(value.get(key))}`).join(",")}}`;
}

/**
 * Orders strings by code point, as Rust compares `str`s (their UTF-8 bytes).
 * JavaScript's default sort compares UTF-16 code units instead, which puts
 * characters above U+FFFF (surrogate pairs) before U+E000..U+FFFF.
 */
export function compareCodePoints(a, b) {
  const length = Math.min(a.length, b.length);
  for (let i = 0; i < length; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x !== y) {
      return codePointRank(x) - codePointRank(y);
    }
  }
  return a.length - b.length;
}

/** Moves surrogates (parts of characters above U+FFFF) after U+FFFF. */
function codePointRank(unit) {
  if (unit >= 0xe000) return unit - 0x800;
  if (unit >= 0xd800) return unit + 0x2000;
  return unit;
}

const ESCAPES = { '"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r" };

/**
 * `s` as a JSON string literal: `"`, `\` and control characters escaped (with
 * lowercase hex), everything else as is.
 */
function quote(s) {
  const escaped = s.replace(
    /["\\\u0000-\u001f]/g,
    (c) => ESCAPES[c] ?? `\\u00${c.charCodeAt(0).toString(16).padStart(2, "0")}`,
  );
  return `"${escaped}"`;
}

/**
 * A float as serde_json prints it: the shortest digits that read back as the
 * same number, in fixed notation with at least one fractional digit when the
 * decimal point falls within 16 digits left or 4 zeros right of them (`1.0`,
 * `1500000000000000.0`, `0.00001`, `-0.0`), else in exponent notation
 * (`1e+16`, `1.5e-6`).
 */
export function formatFloat(x) {
  if (x === 0) {
    return Object.is(x, -0) ? "-0.0" : "0.0";
  }
  // Shortest round-trip digits: `d.ddd` and the decimal exponent.
  const exponential = Math.abs(x).toExponential();
  const [mantissa, exponent] = exponential.split("e");
  const digits = mantissa.replace(".", "");
  const point = Number(exponent) + 1; // x = 0.<digits> * 10^point
  const sign = x < 0 ? "-" : "";
  if (point > 16 || point < -4) {
    return sign + exponential;
  }
  if (point <= 0) {
    return `${sign}0.${"0".repeat(-point)}${digits}`;
  }
  if (point >= digits.length) {
    return `${sign}${digits}${"0".repeat(point - digits.length)}.0`;
  }
  return `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
}
