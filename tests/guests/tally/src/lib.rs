//! A recorder for the reliability tests on the embedded bus: every event it
//! receives is an output of another plugin, and it adds one to the counter named
//! after the input that output answers (its `echo-of` header, else its own id).
//! After the appliance stops, the test reads the counters from the state folder:
//! 0 is a lost event, 1 handled once, more a duplicate.

// wit-bindgen's glue (canonical-ABI exports and imports) is unsafe by nature; the
// allowance stays inside this module so the handler itself remains safe code.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../../plugin-sdk/wit",
        world: "handler",
    });

    use super::Tally;
    export!(Tally);
}

use bindings::switchboard::plugin::kv;
use bindings::{Event, Failure, Guest, Output};

struct Tally;

impl Guest for Tally {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        let input = event
            .headers
            .iter()
            .find(|(name, _)| name == "echo-of")
            .map_or(event.id.as_str(), |(_, value)| value.as_str());
        // A store that cannot count is a retry, never a silent success.
        kv::incr(input, 1).map_err(|e| Failure::Retry(format!("kv: {e:?}")))?;
        Ok(Vec::new())
    }
}
