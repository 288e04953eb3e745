//! A well-formed component that targets the wrong world: `handle` takes and returns
//! a string instead of an event and a result. Tests use it to prove the host rejects
//! a plugin whose exports do not match `switchboard:plugin/handler`, and keeps
//! serving the previous version on hot reload.

// wit-bindgen's glue (canonical-ABI exports) is unsafe by nature; the allowance
// stays inside this module so the handler itself remains safe code.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "other",
    });

    use super::WrongWorld;
    export!(WrongWorld);
}

use bindings::Guest;

struct WrongWorld;

impl Guest for WrongWorld {
    fn handle(input: String) -> String {
        format!("wrong world: {input}")
    }
}
