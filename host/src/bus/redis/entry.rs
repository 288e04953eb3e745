//! Messages between stream entries and the bus.
//!
//! An entry's fields: `routing_key`, `body`, `headers` (a JSON array of
//! `[name, value]` pairs), and when present `content_type`, `message_id`; an
//! entry of a plugin's own stream or dead-letter stream also has `exchange`
//! (where the event was first published). What waits in a sorted set (a retry,
//! a delayed output) is the same fields packed into one member
//! ([`pack`]), which the mover's Lua script unpacks into `XADD`.

use bytes::Bytes;

use crate::bus::Message;

pub const ROUTING_KEY: &str = "routing_key";
pub const BODY: &str = "body";
pub const HEADERS: &str = "headers";
pub const CONTENT_TYPE: &str = "content_type";
pub const MESSAGE_ID: &str = "message_id";
pub const EXCHANGE: &str = "exchange";

/// Most bytes one entry (body and headers) may take: Redis takes up to
/// 512 MB per value, but an entry this size already stalls every consumer
/// group reading the stream.
pub const MAX_ENTRY: usize = 16 * 1024 * 1024;

/// One entry as read from a stream: its id and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

impl Entry {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    fn text(&self, name: &str) -> Result<Option<String>, String> {
        self.field(name)
            .map(|v| {
                String::from_utf8(v.to_vec()).map_err(|_| format!("field {name:?} is not UTF-8"))
            })
            .transpose()
    }

    /// Bytes of the entry's fields.
    pub fn size(&self) -> usize {
        self.fields.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// What a well-formed entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub routing_key: String,
    /// The exchange first published to, when the entry says (plugin and
    /// dead-letter streams).
    pub exchange: Option<String>,
    pub message: Message,
}

/// The message in `entry`, or why it is not one (the entry is then
/// dead-lettered as `undecodable`).
pub fn decode(entry: &Entry) -> Result<Decoded, String> {
    let routing_key = entry
        .text(ROUTING_KEY)?
        .ok_or("the entry has no routing_key field")?;
    let body = entry.field(BODY).ok_or("the entry has no body field")?;
    let headers = match entry.field(HEADERS) {
        None => Vec::new(),
        Some(json) => serde_json::from_slice::<Vec<(String, String)>>(json)
            .map_err(|e| format!("the headers field is not a JSON array of [name, value]: {e}"))?,
    };
    Ok(Decoded {
        routing_key,
        exchange: entry.text(EXCHANGE)?,
        message: Message {
            body: Bytes::copy_from_slice(body),
            content_type: entry.text(CONTENT_TYPE)?,
            message_id: entry.text(MESSAGE_ID)?,
            headers,
        },
    })
}

/// The fields `XADD` is given for `message`: `exchange` only for the streams
/// that are not an exchange's own.
pub fn fields(
    exchange: Option<&str>,
    routing_key: &str,
    message: &Message,
) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::with_capacity(6);
    out.push((ROUTING_KEY, routing_key.as_bytes().to_vec()));
    out.push((BODY, message.body.to_vec()));
    // Serializing pairs of strings cannot fail.
    let headers = serde_json::to_vec(&message.headers).unwrap_or_else(|_| b"[]".to_vec());
    out.push((HEADERS, headers));
    if let Some(ct) = &message.content_type {
        out.push((CONTENT_TYPE, ct.as_bytes().to_vec()));
    }
    if let Some(id) = &message.message_id {
        out.push((MESSAGE_ID, id.as_bytes().to_vec()));
    }
    if let Some(exchange) = exchange {
        out.push((EXCHANGE, exchange.as_bytes().to_vec()));
    }
    out
}

/// Bytes `message` takes in an entry.
pub fn size(routing_key: &str, message: &Message) -> usize {
    routing_key.len()
        + message.body.len()
        + message
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
        + message.content_type.as_ref().map_or(0, String::len)
        + message.message_id.as_ref().map_or(0, String::len)
}

/// A sorted-set member: `parts` as netstrings (`<len>:<bytes>,`), binary safe,
/// which the mover's Lua script splits again. The first part makes it unique
/// (the same retry settled twice is one member), the second is the stream it
/// goes to when due, the rest are `XADD`'s field-value pairs.
pub fn pack(uid: &str, target: &str, fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |part: &[u8]| {
        out.extend_from_slice(part.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(part);
        out.push(b',');
    };
    put(uid.as_bytes());
    put(target.as_bytes());
    for (k, v) in fields {
        put(k.as_bytes());
        put(v);
    }
    out
}

/// The parts of a packed member (what the Lua script does, for tests and for
/// reading what waits).
pub fn unpack(member: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut parts = Vec::new();
    let mut rest = member;
    while !rest.is_empty() {
        let colon = rest.iter().position(|b| *b == b':')?;
        let len: usize = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
        let start = colon + 1;
        let end = start.checked_add(len)?;
        if rest.get(end) != Some(&b',') {
            return None;
        }
        parts.push(rest[start..end].to_vec());
        rest = &rest[end + 1..];
    }
    Some(parts)
}

/// The entry a packed member becomes when due (id left empty).
pub fn unpacked_entry(member: &[u8]) -> Option<(String, Entry)> {
    let parts = unpack(member)?;
    let mut parts = parts.into_iter();
    let _uid = parts.next()?;
    let target = String::from_utf8(parts.next()?).ok()?;
    let mut fields = Vec::new();
    while let Some(k) = parts.next() {
        fields.push((String::from_utf8(k).ok()?, parts.next()?));
    }
    Some((
        target,
        Entry {
            id: String::new(),
            fields,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        Message {
            body: Bytes::from_static(b"\x00\xffbinary,:body"),
            content_type: Some("application/json".into()),
            message_id: Some("m-1".into()),
            headers: vec![("tenant".into(), "acme".into())],
        }
    }

    #[test]
    fn a_message_survives_an_entry_and_a_packed_member() {
        let m = message();
        let f = fields(Some("payments"), "payment.success", &m);
        let entry = Entry {
            id: "1-0".into(),
            fields: f
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect(),
        };
        let d = decode(&entry).unwrap();
        assert_eq!(d.message, m);
        assert_eq!(d.routing_key, "payment.success");
        assert_eq!(d.exchange.as_deref(), Some("payments"));

        let member = pack("uid-1", "sb:q:billing", &f);
        let (target, back) = unpacked_entry(&member).unwrap();
        assert_eq!(target, "sb:q:billing");
        assert_eq!(decode(&back).unwrap(), d);
        assert_eq!(unpack(b"3:abc,"), Some(vec![b"abc".to_vec()]));
        assert_eq!(unpack(b"3:abcd,"), None, "a length that lies");
    }

    #[test]
    fn an_entry_missing_its_fields_says_why() {
        let entry = |fields: &[(&str, &[u8])]| Entry {
            id: "1-0".into(),
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.to_vec()))
                .collect(),
        };
        assert!(
            decode(&entry(&[("body", b"{}")]))
                .unwrap_err()
                .contains("routing_key")
        );
        assert!(
            decode(&entry(&[("routing_key", b"a.b")]))
                .unwrap_err()
                .contains("body")
        );
        let bad = decode(&entry(&[
            ("routing_key", b"a.b"),
            ("body", b"{}"),
            ("headers", b"{"),
        ]))
        .unwrap_err();
        assert!(bad.contains("headers field"), "{bad}");
        let ok = decode(&entry(&[("routing_key", b"a.b"), ("body", b"{}")])).unwrap();
        assert!(ok.message.headers.is_empty());
        assert_eq!(size("a.b", &message()), 3 + 14 + 6 + 4 + 8 + 16 + 3);
    }
}
