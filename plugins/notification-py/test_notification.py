"""Unit tests of the pure-Python parts; run with `python3 -m unittest` here.

The expected values are what serde_json 1.0.154 (with `float_roundtrip`) and the
Rust plugin's `template.rs` give.
"""

import unittest
from types import SimpleNamespace

from strictjson import JSONError, dumps, format_number, loads
from templates import BUILT_IN_KINDS, Templates, lookup, render, trim


class ParsingTest(unittest.TestCase):
    def test_accepts_what_serde_json_accepts(self):
        cases = [
            (b" [1, -2, 3.5] ", "[1,-2,3.5]"),
            (b'{"b":1,"a":2,"a":3,"\\u00e9":[],"z":{}}', '{"a":3,"b":1,"z":{},"\xe9":[]}'),
            (b'"\\ud83d\\ude00\\/\\u001F\\u007f"', '"\U0001F600/\\u001f\x7f"'),
            (b"18446744073709551615", "18446744073709551615"),
            (b"18446744073709551616", "1.8446744073709552e+19"),
            (b"-9223372036854775808", "-9223372036854775808"),
            (b"-9223372036854775809", "-9.223372036854776e+18"),
            (b"-0", "-0.0"),
            (b"0e5", "0.0"),
            (b"1e-400", "0.0"),
            (b"\t\r\n true", "true"),
            (b"[" * 127 + b"]" * 127, "[" * 127 + "]" * 127),
        ]
        for text, expected in cases:
            with self.subTest(text=text[:40]):
                self.assertEqual(dumps(loads(text)), expected)

    def test_rejects_what_serde_json_rejects(self):
        cases = [
            b"", b" ", b"01", b"+1", b"1.", b".5", b"1e", b"NaN", b"-Infinity", b"1e400",
            b"[1,]", b'{"a":1,}', b"{1:2}", b"\xef\xbb\xbf{}", b"\x0c1", b"1 x", b"tru",
            b'"\\ud800"', b'"\\udc00"', b'"\\ud800\\u0041"', b'"\\x"', b'"a\x01"', b'"\xff"',
            b'"\xed\xa0\x80"', b"[" * 128 + b"]" * 128,
        ]
        for text in cases:
            with self.subTest(text=text[:40]):
                self.assertRaises(JSONError, loads, text)

    def test_numbers_print_as_serde_json_displays_them(self):
        cases = [
            (0, "0"), (-0.0, "-0.0"), (1.0, "1.0"), (42.5, "42.5"), (0.1, "0.1"),
            (1e15, "1000000000000000.0"), (1e16, "1e+16"), (1.2345678901234567e16, "1.2345678901234568e+16"),
            (1e-5, "0.00001"), (1.2345e-6, "1.2345e-6"), (1e21, "1e+21"), (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"), (1234567890123456.8, "1234567890123456.8"),
        ]
        for number, expected in cases:
            with self.subTest(number=number):
                self.assertEqual(format_number(number), expected)

    def test_strings_escape_as_serde_json_does(self):
        self.assertEqual(dumps('"\\\b\t\n\f\r\x00\x1f\x7f\u2028é'), '"\\"\\\\\\b\\t\\n\\f\\r\\u0000\\u001f\x7f\u2028é"')


class TemplatesTest(unittest.TestCase):
    EVENT = SimpleNamespace(id="evt-9", kind="order.created", source="", time="",
                            tenant_id="acme", correlation_id=None)
    DATA = loads(b'{"order_id": "o-1", "total": 12.5, "paid": true, "count": 3, "big": 1e16,'
                 b' "customer": {"name": "Ada", "tags": ["vip", "early"]}, "empty": "", "nothing": null}')

    def test_placeholders_render_as_in_rust(self):
        cases = [
            ("Order {{order_id}}", "Order o-1"),
            ("{{ total }} / {{paid}} / {{count}} / {{big}}", "12.5 / true / 3 / 1e+16"),
            ("Hi {{customer.name}} ({{customer.tags.0}}, {{customer.tags.+1}}, {{customer.tags.01}})",
             "Hi Ada (vip, early, early)"),
            ("{{customer.tags.-0}}{{customer.tags.2}}{{customer.tags. 1}}{{customer.tags.1 }}", "early"),
            ("{{customer}}", '{"name":"Ada","tags":["vip","early"]}'),
            ("{{event.id}} {{event.kind}} {{event.tenant_id}}", "evt-9 order.created acme"),
            ("[{{missing}}][{{empty}}][{{nothing}}][{{order_id.deeper}}][{{event.nope}}]", "[][][][][]"),
            ("Hi {{missing| there }}, {{empty|friend|x}} {{event.source|-}}", "Hi  there , friend|x -"),
            ("unclosed {{order_id", "unclosed {{order_id"),
            ("{{order_id}}}} {{{order_id}}", "o-1}} "),
            ("{{\u0085order_id\u3000}} {{\x1corder_id}}", "o-1 "),
        ]
        for template, expected in cases:
            with self.subTest(template=template):
                self.assertEqual(render(template, self.EVENT, self.DATA), expected)

    def test_lookup_reads_array_indexes_as_rust_usize(self):
        data = loads(b"[10, 11]")
        for path, expected in [("0", 10), ("+1", 11), ("0001", 11), ("+", None), ("-1", None),
                               ("", None), ("1" * 30, None), ("\u0661", None), ("1_0", None)]:
            with self.subTest(path=path):
                self.assertEqual(lookup(data, path), expected)

    def test_trim_uses_rusts_whitespace(self):
        self.assertEqual(trim("\u0085\ufeff\u00a0x\u001c\u3000"), "\ufeff\u00a0x\u001c")

    def test_config_overrides_defaults_and_adds_kinds(self):
        config = {
            "payment.success.subject": "Paid: {{amount}}",
            "payment.success.template_id": "pay-ok-v2",
            "payment.success.sms": " \u2028",
            "invoice.overdue.body": "Invoice {{id}} overdue",
        }.get
        for kind in BUILT_IN_KINDS:
            self.assertIsNotNone(Templates.resolve(kind, lambda _: None).sms, kind)
        self.assertIsNone(Templates.resolve("inventory.low", config))
        t = Templates.resolve("payment.success", config)
        self.assertEqual((t.subject, t.template_id, t.sms), ("Paid: {{amount}}", "pay-ok-v2", None))
        self.assertIn("{{payment_id}}", t.body)
        t = Templates.resolve("invoice.overdue", config)
        self.assertEqual((t.subject, t.body, t.sms), ("{{event.kind}}", "Invoice {{id}} overdue", None))


if __name__ == "__main__":
    unittest.main()
