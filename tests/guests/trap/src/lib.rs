//! A broken release: a well-formed handler of the right world that traps on
//! every event (an abort, which is a WebAssembly `unreachable`: no panic message). It loads fine,
//! so only running it shows what is wrong.

// wit-bindgen's glue (canonical-ABI exports and imports) is unsafe by nature; the
// allowance stays inside this module so the handler itself remains safe code.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../../plugin-sdk/wit",
        world: "handler",
    });

    use super::Trap;
    export!(Trap);
}

use bindings::{Event, Failure, Guest, Output};

struct Trap;

impl Guest for Trap {
    fn handle(_event: Event) -> Result<Vec<Output>, Failure> {
        std::process::abort()
    }
}
