//! The smallest possible Switchboard handler: every event succeeds with no outputs.
//! Benchmarks use it to measure the host's own cost per event.

// wit-bindgen's glue (canonical-ABI exports and imports) is unsafe by nature; the
// allowance stays inside this module so the handler itself remains safe code.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../../plugin-sdk/wit",
        world: "handler",
    });

    use super::Noop;
    export!(Noop);
}

use bindings::{Event, Failure, Guest, Output};

struct Noop;

impl Guest for Noop {
    fn handle(_event: Event) -> Result<Vec<Output>, Failure> {
        Ok(Vec::new())
    }
}
