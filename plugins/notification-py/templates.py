"""Templates: the built-in defaults, the config that overrides them, and the
`{{placeholder}}` rendering.

A port of the Rust plugin's `template.rs`; the rendering must give the same text,
character for character, so string handling follows Rust's rules (see `trim`).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import strictjson

#: The kinds handled with no configuration at all: the eight business events, and
#: the two the billing plugin emits (which carry the bill's customer).
BUILT_IN_KINDS = (
    "payment.success",
    "payment.failed",
    "bill.created",
    "order.created",
    "order.shipped",
    "user.created",
    "ticket.purchased",
    "listing.sold",
    "bill.paid",
    "bill.payment_failed",
)

# Built-in (subject, body, sms) templates. They only use fields the usual
# producers send, with fallbacks where a field is often missing.
_DEFAULTS = {
    "payment.success": (
        "Payment received",
        "We received your payment of {{amount}} {{currency}}. Reference: {{payment_id}}.",
        "Payment of {{amount}} {{currency}} received. Ref {{payment_id}}.",
    ),
    "payment.failed": (
        "Your payment did not go through",
        "Your payment of {{amount}} {{currency}} failed: {{reason|no reason given}}. "
        "Please try again or use another payment method. Reference: {{payment_id}}.",
        "Payment of {{amount}} {{currency}} failed: {{reason|no reason given}}.",
    ),
    "bill.created": (
        "New bill {{bill_id}}",
        "Your bill {{bill_id}} for {{amount}} {{currency}} is ready.",
        "New bill {{bill_id}}: {{amount}} {{currency}}.",
    ),
    "order.created": (
        "Order {{order_id}} confirmed",
        "Thank you for your order {{order_id}}. We will let you know when it ships.",
        "Order {{order_id}} confirmed.",
    ),
    "order.shipped": (
        "Order {{order_id}} has shipped",
        "Your order {{order_id}} is on its way. "
        "Tracking number: {{tracking_number|not available yet}}.",
        "Order {{order_id}} shipped. Tracking: {{tracking_number|n/a}}.",
    ),
    "user.created": (
        "Welcome, {{name|there}}!",
        "Hi {{name|there}}, your account is ready. We are glad to have you.",
        "Welcome, {{name|there}}! Your account is ready.",
    ),
    "ticket.purchased": (
        "Your tickets for {{event_name|your event}}",
        "Your tickets for {{event_name|your event}} are confirmed. "
        "Ticket: {{ticket_id}}. Quantity: {{quantity|1}}.",
        "Tickets for {{event_name|your event}} confirmed. Ticket {{ticket_id}}.",
    ),
    "listing.sold": (
        "Your listing {{listing_id}} sold",
        "Good news: your listing {{listing_id}} sold for {{price|the asking price}}.",
        "Your listing {{listing_id}} sold.",
    ),
    "bill.paid": (
        "Bill {{bill_id}} is paid",
        "Thank you: bill {{bill_id}} is paid ({{amount}} {{currency}}). "
        "Payment reference: {{payment_id}}.",
        "Bill {{bill_id}} paid: {{amount}} {{currency}}.",
    ),
    "bill.payment_failed": (
        "Payment for bill {{bill_id}} failed",
        "We could not collect {{amount}} {{currency}} for bill {{bill_id}}: "
        "{{reason|no reason given}}. Please update your payment method.",
        "Payment for bill {{bill_id}} failed: {{reason|no reason given}}.",
    ),
}

#: Rust's `char::is_whitespace` (the Unicode White_Space property). Python's
#: `str.strip()` uses a different set (it also strips U+001C..U+001F), so
#: trimming always goes through `trim`.
RUST_WHITESPACE = (
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def trim(text: str) -> str:
    """`text` without leading and trailing whitespace, as Rust's `str::trim`."""
    return text.strip(RUST_WHITESPACE)


@dataclass(frozen=True)
class Templates:
    """The templates for one kind, after config overrides."""

    #: `template_id` of the outputs: config `<kind>.template_id`, else the kind.
    template_id: str
    #: Email subject.
    subject: str
    #: Email body.
    body: str
    #: SMS text; `None` when SMS is off for this kind (configured as empty).
    sms: Optional[str]

    @staticmethod
    def resolve(kind: str, config: Callable[[str], Optional[str]]) -> Optional["Templates"]:
        """The templates for `kind`, or `None` when the plugin does not notify on it.

        Built-in kinds always have templates (config `<kind>.subject`, `.body`,
        `.sms`, `.template_id` override the defaults); any other kind only when
        `config` gives it a `<kind>.body`.
        """

        def get(field: str, default: Optional[str] = None) -> Optional[str]:
            value = config(f"{kind}.{field}")
            return default if value is None else value

        defaults = _DEFAULTS.get(kind)
        if defaults is not None:
            default_subject, default_body, default_sms = defaults
            subject = get("subject", default_subject)
            body = get("body", default_body)
            sms = get("sms", default_sms)
        else:
            subject = get("subject", "{{event.kind}}")
            body = get("body")
            if body is None:
                return None
            sms = get("sms", "")
        return Templates(
            template_id=get("template_id", kind),
            subject=subject,
            body=body,
            sms=sms if trim(sms) else None,
        )


def render(template: str, event, data) -> str:
    """Renders `template`, replacing each `{{placeholder}}`:

    - `{{event.id}}`, `{{event.kind}}`, `{{event.source}}`, `{{event.time}}`,
      `{{event.tenant_id}}`, `{{event.correlation_id}}`: the event's own fields;
    - `{{a.b.c}}`: a dotted path into the event's JSON data (objects by key,
      arrays by index). Strings, numbers and booleans render plainly, objects and
      arrays as compact JSON;
    - `{{path|fallback}}`: the fallback text when the path is missing, null or an
      empty string. Without a fallback, such a placeholder renders as nothing.

    Text is not escaped (the outputs are plain text); an unclosed `{{` stays as is.
    The path is trimmed, the fallback is kept as written.
    """
    out = []
    rest = template
    while (start := rest.find("{{")) != -1:
        out.append(rest[:start])
        after = rest[start + 2 :]
        end = after.find("}}")
        if end == -1:
            out.append(rest[start:])
            return "".join(out)
        path, bar, fallback = after[:end].partition("|")
        value = _resolve(trim(path), event, data)
        out.append(value if value else fallback if bar else "")
        rest = after[end + 2 :]
    out.append(rest)
    return "".join(out)


_EVENT_FIELDS = ("id", "kind", "source", "time", "tenant_id", "correlation_id")


def _resolve(path: str, event, data) -> Optional[str]:
    """The text a placeholder path stands for, or `None`."""
    if path.startswith("event."):
        field = path[len("event.") :]
        return getattr(event, field) if field in _EVENT_FIELDS else None
    return _plain(lookup(data, path))


_MISSING = object()


def lookup(data, path: str):
    """The value at dotted `path` in `data`; `None` when missing (or null).

    Objects are indexed by key, arrays by a segment that Rust parses as a `usize`
    (ASCII digits, optionally after one `+`: "01" and "+1" are index 1).
    """
    value = data
    for segment in path.split("."):
        if isinstance(value, dict):
            value = value.get(segment, _MISSING)
        elif isinstance(value, list):
            index = _parse_usize(segment)
            value = value[index] if index is not None and index < len(value) else _MISSING
        else:
            value = _MISSING
        if value is _MISSING:
            return None
    return value


_ASCII_DIGITS = frozenset("0123456789")


def _parse_usize(segment: str) -> Optional[int]:
    """`segment` as Rust's `str::parse::<usize>()` reads it, or `None`."""
    digits = segment[1:] if segment.startswith("+") else segment
    if not digits or not _ASCII_DIGITS.issuperset(digits):
        return None
    digits = digits.lstrip("0") or "0"
    # Too long for u64: no array is that long anyway (and int() has a size cap).
    return int(digits) if len(digits) <= 20 else None


def _plain(value) -> Optional[str]:
    """A data value as placeholder text: `None` for null (and missing)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return strictjson.dumps(value)
