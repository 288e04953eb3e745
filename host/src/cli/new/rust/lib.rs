//! `{{name}}`: a Switchboard plugin.
//!
//! It answers each `greeting.requested` event, whose data is JSON with a `name`,
//! with one `greeting.sent` event: `{"greeting": "Hello, <name>!"}`. It ignores
//! every other kind. A `greeting.requested` event without a name is rejected (it
//! goes to the dead-letter queue with the reason). The greeting word comes from the
//! plugin's `greeting` configuration value in router.toml, "Hello" by default.

// The bindings: the world's types (`Event`, `Output`, `Failure`) and the `Guest`
// trait here, the imported interfaces under `switchboard::plugin`.
wit_bindgen::generate!({ path: "wit", world: "handler" });

use switchboard::plugin::config;
use switchboard::plugin::logging::{Level, log};

struct Plugin;

impl Guest for Plugin {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        if event.kind != "greeting.requested" {
            return Ok(vec![]);
        }
        let data: serde_json::Value = serde_json::from_slice(&event.data).map_err(|err| {
            Failure::Reject(format!("event {}: data is not JSON: {err}", event.id))
        })?;
        let Some(name) = data["name"].as_str().filter(|name| !name.is_empty()) else {
            return Err(Failure::Reject(format!(
                "event {}: no name to greet",
                event.id
            )));
        };
        let greeting = config::get("greeting")
            .filter(|greeting| !greeting.is_empty())
            .unwrap_or_else(|| "Hello".to_owned());
        log(Level::Info, &format!("greeting {name}"));

        let data = serde_json::json!({ "greeting": format!("{greeting}, {name}!") });
        Ok(vec![Output {
            kind: "greeting.sent".to_owned(),
            content_type: Some("application/json".to_owned()),
            data: data.to_string().into_bytes(),
            exchange: None,
            headers: vec![],
        }])
    }
}

export!(Plugin);
