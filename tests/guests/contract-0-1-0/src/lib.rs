//! A plugin as it was written against contract 0.1.0 (`wit/` is that contract,
//! frozen): it counts events in kv, remembers the last id and reads its config.
//! Newer hosts must keep running it unchanged.

// wit-bindgen's glue is unsafe by nature; the allowance stays inside this module.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "handler",
    });

    use super::Counter;
    export!(Counter);
}

use bindings::switchboard::plugin::{config, kv, logging};
use bindings::{Event, Failure, Guest, Output};

struct Counter;

impl Guest for Counter {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        let kv_error = |e: kv::KvError| Failure::Reject(format!("kv: {e:?}"));
        let count = kv::incr("count", 1).map_err(kv_error)?;
        let last = kv::get("last").map_err(kv_error)?;
        kv::set("last", event.id.as_bytes(), None).map_err(kv_error)?;
        logging::log(
            logging::Level::Debug,
            &format!("event {} counted", event.id),
        );
        let data = serde_json::json!({
            "count": count,
            "greeting": config::get("greeting"),
            "last": event.id,
            "previous": last.map(|v| String::from_utf8_lossy(&v).into_owned()),
        });
        Ok(vec![Output {
            kind: "counted".into(),
            content_type: None,
            data: data.to_string().into_bytes(),
            exchange: None,
            headers: Vec::new(),
        }])
    }
}
