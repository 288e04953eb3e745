//! The two steps of a C plugin's build that need the component-model tooling:
//!
//! - `c-plugin-tool bindings WIT_DIR WORLD OUT_DIR`: the C bindings of WORLD
//!   (handler.c, handler.h, handler_component_type.o), exactly what
//!   `wit-bindgen c WIT_DIR --world WORLD --out-dir OUT_DIR` writes with the
//!   wit-bindgen-cli of the same version.
//! - `c-plugin-tool wrap CORE.wasm OUT.wasm`: the component, from a wasm32-wasi
//!   (preview 1) core module linked with `-mexec-model=reactor` that carries its
//!   `component-type` section, with the wasi_snapshot_preview1 reactor adapter:
//!   what `wasm-tools component new CORE.wasm --adapt
//!   wasi_snapshot_preview1=wasi_snapshot_preview1.reactor.wasm -o OUT.wasm` does.
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;
use wit_bindgen_core::Files;
use wit_bindgen_core::wit_parser::Resolve;
use wit_component::ComponentEncoder;

const USAGE: &str = "usage: c-plugin-tool bindings WIT_DIR WORLD OUT_DIR\n       c-plugin-tool wrap CORE.wasm OUT.wasm";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["bindings", wit, world, out] => bindings(wit, world, out),
        ["wrap", input, output] => wrap(input, output),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("c-plugin-tool: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn bindings(wit: &str, world: &str, out: &str) -> Result<()> {
    let mut resolve = Resolve::default();
    let (package, _) = resolve
        .push_path(wit)
        .with_context(|| format!("reading {wit}"))?;
    let world = resolve.select_world(&[package], Some(world))?;
    let mut files = Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {out}"))?;
    for (name, contents) in files.iter() {
        let path = Path::new(out).join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn wrap(input: &str, output: &str) -> Result<()> {
    let module = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    let component = ComponentEncoder::default()
        .module(&module)?
        .adapter(
            "wasi_snapshot_preview1",
            WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?
        .validate(true)
        .encode()?;
    std::fs::write(output, component).with_context(|| format!("writing {output}"))?;
    Ok(())
}
