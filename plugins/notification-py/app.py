"""`notification`: turns business events into notification requests.

The Python port of the Rust `notification` plugin; both give the same outputs,
byte for byte, for every event and configuration.

For each event of a kind it knows, it renders templates against the event's JSON
data and emits a `notification.email` and, when the data carries a phone number,
a `notification.sms`. A delivery service consumes those; this plugin never talks
to a mail or SMS provider itself.

Input
-----

Kinds handled out of the box: `payment.success`, `payment.failed`,
`bill.created`, `order.created`, `order.shipped`, `user.created`,
`ticket.purchased`, `listing.sold`, and the billing plugin's `bill.paid` and
`bill.payment_failed` (which carry the bill's `customer`); also any other kind
for which config has a `<kind>.body` template. Other kinds: no outputs. Data must
be JSON, else the event is rejected.

The email recipient is the first non-empty string among the data's `email`,
`recipient.email`, `customer.email`, `user.email`, `buyer.email`, `to`; the phone
number among `phone`, `customer.phone`, `user.phone`, `buyer.phone`. An event
with neither is rejected (`no recipient: ...`); one with only a phone gets only
the SMS.

Output
------

- `notification.email`: `{"recipient", "template_id", "subject", "body"}`
- `notification.sms`: `{"recipient", "template_id", "body"}` (recipient = phone)

Config (all optional)
---------------------

- `<kind>.subject`, `<kind>.body`: the email templates;
- `<kind>.sms`: the SMS template; set it to `""` to send no SMS for that kind;
- `<kind>.template_id`: the outputs' `template_id` (default: the kind).

Templates use `{{path.to.field}}` into the data, `{{event.id}}`,
`{{event.kind}}` and `{{path|fallback}}`; see `templates.render`.

The plugin keeps no state: a redelivered event renders the same outputs.

Modules: `app` (this one: the handler), `templates` (defaults, config, rendering)
and `strictjson` (JSON parsed and written exactly as Rust's serde_json does, which
is what makes the outputs byte-identical).
"""

from typing import List, Optional, Sequence

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, logging, types

import strictjson
from templates import Templates, lookup, render, trim

#: Where the email address is looked for, in this order.
EMAIL_PATHS = ("email", "recipient.email", "customer.email", "user.email", "buyer.email", "to")
#: Where the phone number is looked for, in this order.
PHONE_PATHS = ("phone", "customer.phone", "user.phone", "buyer.phone")

#: Kind of the email output.
EMAIL = "notification.email"
#: Kind of the SMS output.
SMS = "notification.sms"
#: Content type of both outputs.
JSON = "application/json"


class WitWorld(wit_world.WitWorld):
    """The plugin: the `handle` export of the `handler` world."""

    def handle(self, event: types.Event) -> List[types.Output]:
        templates = Templates.resolve(event.kind, config.get)
        if templates is None:
            return []
        try:
            data = strictjson.loads(event.data)
        except strictjson.JSONError as err:
            raise reject(f"{event.kind} event {event.id}: data is not the expected JSON: {err}")
        return notify(event, data, templates)


def notify(event: types.Event, data, templates: Templates) -> List[types.Output]:
    """The outputs for `event` (with parsed `data`) rendered from `templates`."""
    email = first_string(data, EMAIL_PATHS)
    phone = first_string(data, PHONE_PATHS) if templates.sms is not None else None
    if email is None and phone is None:
        raise reject(
            f"no recipient: {event.kind} event {event.id} has no email at "
            f"{', '.join(EMAIL_PATHS)} (nor a phone at {', '.join(PHONE_PATHS)})"
        )

    outputs = []
    if email is not None:
        outputs.append(json_output(EMAIL, {
            "recipient": email,
            "template_id": templates.template_id,
            "subject": render(templates.subject, event, data),
            "body": render(templates.body, event, data),
        }))
    if phone is not None:
        outputs.append(json_output(SMS, {
            "recipient": phone,
            "template_id": templates.template_id,
            "body": render(templates.sms, event, data),
        }))
    logging.log(logging.Level.DEBUG, f"{len(outputs)} notification(s) for {event.kind}")
    return outputs


def first_string(data, paths: Sequence[str]) -> Optional[str]:
    """The first non-empty string (once trimmed) found at one of `paths`."""
    for path in paths:
        value = lookup(data, path)
        if isinstance(value, str) and trim(value):
            return trim(value)
    return None


def json_output(kind: str, value: dict) -> types.Output:
    """An output of `kind` whose data is `value` as JSON (like the SDK's `Output::json`)."""
    data = strictjson.dumps(value).encode("utf-8")
    return types.Output(kind=kind, content_type=JSON, data=data, exchange=None, headers=[])


def reject(message: str) -> Err:
    """The exception that makes the host dead-letter the event with `message`."""
    return Err(types.Failure_Reject(message))
