"""Strict JSON, parsed and written exactly as Rust's `serde_json` does it.

The Rust plugins parse event data with `serde_json::from_slice` into a
`serde_json::Value` and write outputs with `serde_json::to_vec`. Python's own
`json` module differs from both in many small ways (it accepts `NaN`, lone
surrogates and any nesting depth; it formats floats and orders keys
differently), so this module reimplements the two directions:

- `loads(data)` accepts exactly the byte strings `serde_json` accepts and returns
  the same value: `dict`, `list`, `str`, `bool`, `None`, `int` (an integer literal
  that fits `u64`, or `i64` when negative) or `float` (everything else, including
  `-0` and integers too large for 64 bits). Anything else raises `JSONError`.
- `dumps(value)` writes such a value as compact JSON, with object keys sorted by
  code point (serde_json's `Map` is a `BTreeMap`) and serde_json's escaping.
- `format_number(n)` is serde_json's `Display` for a number.

Only the standard library is used.
"""

import math
import re

__all__ = ["JSONError", "MAX_DEPTH", "loads", "dumps", "format_number"]

#: serde_json refuses to nest arrays and objects this deep (127 is accepted).
MAX_DEPTH = 128

_U64_MAX = 2**64 - 1
_I64_MIN = -(2**63)

# JSON's whitespace; nothing else (no BOM, no form feed, no Unicode spaces).
_WS = re.compile(r"[ \t\n\r]*")
# The number grammar of RFC 8259, ASCII digits only.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
# A run of string characters that need no special handling.
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}


class JSONError(ValueError):
    """The data is not JSON that serde_json would accept."""


def loads(data):
    """Parses `data` (bytes or str) as one JSON value, as serde_json does."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise JSONError(f"invalid UTF-8 at byte {err.start}") from None
    else:
        text = data
    return _Parser(text).document()


class _Parser:
    """Recursive descent over `text`; `pos` is the next character to read."""

    def __init__(self, text):
        self.text = text
        self.pos = 0
        self.depth = 0

    def fail(self, message):
        raise JSONError(f"{message} at character {self.pos}")

    def skip_ws(self):
        self.pos = _WS.match(self.text, self.pos).end()

    def peek(self):
        return self.text[self.pos : self.pos + 1]

    def document(self):
        self.skip_ws()
        value = self.value()
        self.skip_ws()
        if self.pos != len(self.text):
            self.fail("trailing characters")
        return value

    def value(self):
        char = self.peek()
        if char == '"':
            return self.string()
        if char == "{":
            return self.container(self.object_body)
        if char == "[":
            return self.container(self.array_body)
        if char == "-" or "0" <= char <= "9":
            return self.number()
        for literal, value in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(literal, self.pos):
                self.pos += len(literal)
                return value
        self.fail("end of input" if not char else "expected a value")

    def container(self, body):
        self.depth += 1
        if self.depth >= MAX_DEPTH:
            self.fail("recursion limit exceeded")
        self.pos += 1  # the opening bracket
        value = body()
        self.depth -= 1
        return value

    def array_body(self):
        items = []
        self.skip_ws()
        if self.peek() == "]":
            self.pos += 1
            return items
        while True:
            self.skip_ws()
            items.append(self.value())
            self.skip_ws()
            char = self.peek()
            self.pos += 1
            if char == "]":
                return items
            if char != ",":
                self.fail("expected ',' or ']'")

    def object_body(self):
        members = {}
        self.skip_ws()
        if self.peek() == "}":
            self.pos += 1
            return members
        while True:
            self.skip_ws()
            if self.peek() != '"':
                self.fail("expected a string key")
            key = self.string()
            self.skip_ws()
            if self.peek() != ":":
                self.fail("expected ':'")
            self.pos += 1
            self.skip_ws()
            members[key] = self.value()  # a repeated key: the last one wins
            self.skip_ws()
            char = self.peek()
            self.pos += 1
            if char == "}":
                return members
            if char != ",":
                self.fail("expected ',' or '}'")

    def string(self):
        self.pos += 1  # the opening quote
        parts = []
        while True:
            end = _PLAIN.match(self.text, self.pos).end()
            parts.append(self.text[self.pos : end])
            self.pos = end
            char = self.peek()
            if char == '"':
                self.pos += 1
                return "".join(parts)
            if char == "\\":
                self.pos += 1
                parts.append(self.escape())
            elif char:
                self.fail("control character in string")
            else:
                self.fail("unterminated string")

    def escape(self):
        char = self.peek()
        self.pos += 1
        if char in _ESCAPES:
            return _ESCAPES[char]
        if char != "u":
            self.fail("invalid escape")
        code = self.hex4()
        if 0xDC00 <= code <= 0xDFFF:
            self.fail("lone trailing surrogate in hex escape")
        if 0xD800 <= code <= 0xDBFF:
            if not self.text.startswith("\\u", self.pos):
                self.fail("unexpected end of hex escape")
            self.pos += 2
            low = self.hex4()
            if not 0xDC00 <= low <= 0xDFFF:
                self.fail("lone leading surrogate in hex escape")
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        return chr(code)

    def hex4(self):
        match = _HEX4.match(self.text, self.pos)
        if not match:
            self.fail("invalid escape")
        self.pos = match.end()
        return int(match.group(), 16)

    def number(self):
        match = _NUMBER.match(self.text, self.pos)
        if not match:
            self.fail("invalid number")
        self.pos = match.end()
        literal = match.group()
        fraction, exponent = match.group(1, 2)
        # An integer literal stays exact when it fits u64 (i64 when negative);
        # 21 characters is enough for any of those, and keeps int() cheap.
        if fraction is None and exponent is None and len(literal) <= 21:
            if literal == "-0":
                return -0.0
            number = int(literal)
            if _I64_MIN <= number <= _U64_MAX:
                return number
        # Python's float() rounds decimal text correctly, as serde_json does with
        # its `float_roundtrip` feature; underflow gives 0.0.
        number = float(literal)
        if number in (float("inf"), float("-inf")):
            self.fail("number out of range")
        return number


# --- writing -----------------------------------------------------------------

_NAMED = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _escape_char(match):
    char = match.group()
    return _NAMED.get(char) or f"\\u{ord(char):04x}"


def _quote(text):
    """A JSON string literal for `text`: only `"`, `\\` and C0 controls escaped."""
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


def dumps(value):
    """`value` as compact JSON text, as `serde_json::to_string` writes it."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, list):
        return "[" + ",".join(dumps(item) for item in value) + "]"
    if isinstance(value, dict):
        # Code point order of str equals the byte order of their UTF-8 encoding.
        members = (_quote(key) + ":" + dumps(value[key]) for key in sorted(value))
        return "{" + ",".join(members) + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def format_number(number):
    """A JSON number as serde_json displays it.

    Integers print in plain decimal. A float prints its shortest round-trip digits
    (those of Python's `repr`), in fixed notation with at least one fractional
    digit when its decimal exponent is in -5..15 (`0.00001`, `1.0`,
    `1000000000000000.0`), otherwise in exponent notation (`1e-6`, `1e+16`,
    `1.2345678901234568e+16`).
    """
    if isinstance(number, int):
        return str(number)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("JSON numbers are finite")
    sign = "-" if math.copysign(1.0, number) < 0 else ""  # -0.0 keeps its sign
    digits, exponent = _shortest_digits(abs(number))
    if digits == "0":
        return sign + "0.0"
    if -5 <= exponent <= 15:
        if exponent < 0:
            return f"{sign}0.{'0' * (-exponent - 1)}{digits}"
        whole = digits[: exponent + 1].ljust(exponent + 1, "0")
        return f"{sign}{whole}.{digits[exponent + 1:] or '0'}"
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'+' if exponent > 0 else '-'}{abs(exponent)}"


def _shortest_digits(number):
    """(digits, exponent) with `number == 0.d1d2... * 10**(exponent + 1)`,

    that is `d1.d2... * 10**exponent`, using the shortest digits that round-trip
    (Python's `repr`), without leading or trailing zeros ("0" for zero).
    """
    text = repr(number)
    mantissa, _, exp = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    exponent = int(exp or 0) + len(whole) - 1
    stripped = digits.lstrip("0")
    exponent -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    return (digits, exponent) if digits else ("0", 0)
