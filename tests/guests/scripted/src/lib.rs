//! A Switchboard handler whose behaviour is chosen by the event's `kind`, so one
//! component can play every part the end-to-end tests need: a well-behaved plugin
//! (`ok`, `echo`, `emit`, `kv`, ...), a flaky one (`retry`, `fail-until`), a
//! poisoned one (`reject`, `bad-output`), a hostile one (`loop`, `oom`, `recurse`,
//! `panic`) and a nosy one that probes the sandbox (`read-file`, `read-env`,
//! `socket`, `clock`).
//!
//! Parameters come from the event's data as a JSON object; empty data means "all
//! defaults", and data that is not JSON is rejected. Built directly with
//! `wit-bindgen` against the shipped WIT rather than through the SDK, so the tests
//! exercise the contract itself.

use std::hint::black_box;

use serde_json::{Value, json};

// wit-bindgen's glue (canonical-ABI exports and imports) is unsafe by nature; the
// allowance stays inside this module so the scripts themselves remain safe code.
#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../../plugin-sdk/wit",
        world: "handler",
    });

    use super::Scripted;
    export!(Scripted);
}

use bindings::switchboard::plugin::{config, kv, logging};
use bindings::{Event, Failure, Guest, Output};

struct Scripted;

impl Guest for Scripted {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        // Only the scripts that take parameters parse the data: `echo` and the rest
        // must accept any payload.
        let params = || params(&event);
        match event.kind.as_str() {
            "ok" => Ok(Vec::new()),
            // With `{"sleep_ms": N}` in JSON data, busy-waits N ms first (a
            // slow handler); any data is echoed.
            "echo" => {
                if let Some(ms) = params().ok().and_then(|p| p.get("sleep_ms")?.as_u64()) {
                    busy_wait(ms);
                }
                Ok(vec![Output {
                    kind: "echoed".into(),
                    content_type: Some(event.content_type.clone()),
                    data: event.data.clone(),
                    exchange: None,
                    headers: vec![("echo-of".into(), event.id.clone())],
                }])
            }
            // Same kind out as in: a plugin feeding itself, for the loop guard.
            "bounce" => Ok(vec![Output {
                kind: "bounce".into(),
                content_type: Some(event.content_type.clone()),
                data: event.data.clone(),
                exchange: None,
                headers: vec![],
            }]),
            // A slow handler: busy-waits `ms` (WASI's monotonic clock), then ok.
            // With `record`, also stores that key once done (proof of handling).
            "sleep" => {
                let params = params()?;
                busy_wait(params.get("ms").and_then(Value::as_u64).unwrap_or(10));
                if let Some(key) = params.get("record").and_then(Value::as_str) {
                    kv::set(key, b"done", None)
                        .map_err(|e| Failure::Reject(format!("kv: {e:?}")))?;
                }
                Ok(vec![])
            }
            "emit" => Ok(emit(&params()?)),
            // With `{"sleep_ms": N}` as data, busy-waits N ms first (a slow
            // failure); any other data is ignored.
            "retry" => {
                if let Some(ms) = params().ok().and_then(|p| p.get("sleep_ms")?.as_u64()) {
                    busy_wait(ms);
                }
                Err(Failure::Retry("asked to retry".into()))
            }
            "reject" => Err(Failure::Reject("asked to reject".into())),
            "fail-until" => fail_until(&event, &params()?),
            "loop" => spin(),
            "oom" => hoard(),
            "recurse" => Ok(vec![json_output(
                "recursed",
                &json!({ "depth": recurse(black_box(0)) }),
            )]),
            "panic" => panic!("scripted panic"),
            "read-file" => read_file(),
            "read-env" => read_env(),
            "socket" => socket(),
            "clock" => clock(),
            "kv" => kv_op(&params()?),
            "config" => {
                let params = params()?;
                let key = str_field(&params, "key").unwrap_or_default();
                Ok(vec![json_output(
                    "config.result",
                    &json!({ "value": config::get(key) }),
                )])
            }
            "log" => {
                log_every_level();
                Ok(Vec::new())
            }
            "big-output" => {
                let bytes = usize_field(&params()?, "bytes").unwrap_or(2 << 20);
                Ok(vec![Output {
                    kind: "big".into(),
                    content_type: Some("application/octet-stream".into()),
                    data: vec![b'x'; bytes],
                    exchange: None,
                    headers: Vec::new(),
                }])
            }
            "many-outputs" => {
                let count = usize_field(&params()?, "count").unwrap_or(10_000);
                Ok((0..count)
                    .map(|i| Output {
                        kind: "many".into(),
                        content_type: Some("text/plain".into()),
                        data: i.to_string().into_bytes(),
                        exchange: None,
                        headers: Vec::new(),
                    })
                    .collect())
            }
            "bad-output" => Ok(vec![json_output("", &json!({}))]),
            other => Err(Failure::Reject(format!("unknown script {other}"))),
        }
    }
}

/// The event's data as JSON: `Null` when empty, a reject when it is not JSON.
fn params(event: &Event) -> Result<Value, Failure> {
    if event.data.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&event.data)
        .map_err(|e| Failure::Reject(format!("data is not JSON: {e}")))
}

fn str_field<'a>(params: &'a Value, name: &str) -> Option<&'a str> {
    params.get(name).and_then(Value::as_str)
}

fn u64_field(params: &Value, name: &str) -> Option<u64> {
    params.get(name).and_then(Value::as_u64)
}

fn usize_field(params: &Value, name: &str) -> Option<usize> {
    u64_field(params, name).and_then(|n| usize::try_from(n).ok())
}

fn json_output(kind: &str, data: &Value) -> Output {
    Output {
        kind: kind.into(),
        content_type: Some("application/json".into()),
        data: data.to_string().into_bytes(),
        exchange: None,
        headers: Vec::new(),
    }
}

/// `count` outputs (default 1) of kind `emitted.<i>`, to `exchange` when given.
/// `count` outputs `emitted.<i>` with data `{"i": i, "tag": tag}`. With
/// `delay_ms` (a number, or any string, passed on as is), each carries the
/// host's delay header: output i asks for `delay_ms + i * step_ms`.
fn emit(params: &Value) -> Vec<Output> {
    let count = usize_field(params, "count").unwrap_or(1);
    let exchange = str_field(params, "exchange").map(str::to_owned);
    let tag = params.get("tag").cloned().unwrap_or(Value::Null);
    let step = u64_field(params, "step_ms").unwrap_or(0);
    (0..count)
        .map(|i| {
            let delay = match params.get("delay_ms") {
                Some(Value::Number(n)) => n.as_u64().map(|ms| (ms + step * i as u64).to_string()),
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            };
            Output {
                exchange: exchange.clone(),
                headers: delay
                    .map(|ms| vec![("switchboard-delay-ms".to_owned(), ms)])
                    .unwrap_or_default(),
                ..json_output(&format!("emitted.{i}"), &json!({ "i": i, "tag": tag }))
            }
        })
        .collect()
}

/// Retries until delivery attempt `succeed_on` (default 3), then succeeds once.
fn fail_until(event: &Event, params: &Value) -> Result<Vec<Output>, Failure> {
    let succeed_on = u64_field(params, "succeed_on").unwrap_or(3);
    if u64::from(event.attempt) < succeed_on {
        return Err(Failure::Retry(format!(
            "attempt {} of {succeed_on}",
            event.attempt
        )));
    }
    Ok(vec![json_output(
        "succeeded",
        &json!({ "attempt": event.attempt }),
    )])
}

/// Busy-waits `ms` milliseconds on WASI's monotonic clock.
fn busy_wait(ms: u64) {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(ms) {
        std::hint::spin_loop();
    }
}

/// Spins forever; `black_box` keeps the optimiser from proving the loop pure.
fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Allocates 1 MiB chunks and writes into every page of each, forever, so the
/// memory is really committed rather than merely reserved.
fn hoard() -> ! {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; 1 << 20];
        chunk.iter_mut().step_by(4096).for_each(|b| *b = 1);
        chunks.push(black_box(chunk));
        black_box(&chunks);
    }
}

/// Recurses until the wasm stack overflows (`Trap::StackOverflow`, bounded by the
/// host's stack limit). The stop condition is opaque to the optimiser and never
/// true in practice, and each frame keeps a value alive across the call and feeds
/// the call's result through `black_box` before using it, so the recursion can be
/// neither turned into a loop nor folded into an accumulator.
///
/// The frame deliberately holds no arrays: locals whose address is taken live on
/// Rust's shadow stack in linear memory, which would run out first and fault as an
/// out-of-bounds access instead of exercising the host's stack limit.
fn recurse(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return depth;
    }
    let kept = black_box(depth.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let below = black_box(recurse(depth + 1));
    below.rotate_left(u32::from(kept.to_le_bytes()[0])) ^ kept
}

fn leaked(what: &str) -> Vec<Output> {
    vec![Output {
        kind: "leaked".into(),
        content_type: Some("text/plain".into()),
        data: what.as_bytes().to_vec(),
        exchange: None,
        headers: Vec::new(),
    }]
}

fn read_file() -> Result<Vec<Output>, Failure> {
    match std::fs::read_to_string("/etc/passwd") {
        Ok(contents) => Ok(leaked(&contents)),
        Err(e) => Err(Failure::Reject(format!("denied: {e}"))),
    }
}

fn read_env() -> Result<Vec<Output>, Failure> {
    let home = std::env::var("HOME");
    let count = std::env::vars().count();
    match home {
        Ok(home) => Ok(leaked(&format!("HOME={home}; {count} variables"))),
        Err(_) if count > 0 => Ok(leaked(&format!("{count} variables"))),
        Err(e) => Err(Failure::Reject(format!("denied: HOME: {e}; 0 variables"))),
    }
}

fn socket() -> Result<Vec<Output>, Failure> {
    match std::net::TcpStream::connect("127.0.0.1:5672") {
        Ok(stream) => Ok(leaked(&format!("connected to {:?}", stream.peer_addr()))),
        Err(e) => Err(Failure::Reject(format!("denied: {e}"))),
    }
}

/// WASI's default wall clock is granted to every plugin; this documents it.
fn clock() -> Result<Vec<Output>, Failure> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Failure::Reject(format!("clock before 1970: {e}")))?;
    let unix_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
    Ok(vec![json_output("clock", &json!({ "unix_ms": unix_ms }))])
}

/// One kv call described by the data; the answer (or the kv-error) as output.
fn kv_op(params: &Value) -> Result<Vec<Output>, Failure> {
    let key = str_field(params, "key").unwrap_or_default();
    let result = match str_field(params, "op") {
        Some("get") => kv::get(key).map(|value| {
            let value = value.map(|v| String::from_utf8_lossy(&v).into_owned());
            json!({ "value": value })
        }),
        Some("set") => {
            let value = str_field(params, "value").unwrap_or_default();
            let ttl_ms = u64_field(params, "ttl_ms");
            kv::set(key, value.as_bytes(), ttl_ms).map(|()| json!({ "ok": true }))
        }
        Some("delete") => kv::delete(key).map(|deleted| json!({ "deleted": deleted })),
        Some("incr") => {
            let delta = params.get("delta").and_then(Value::as_i64).unwrap_or(1);
            kv::incr(key, delta).map(|value| json!({ "value": value }))
        }
        Some("set-if-absent") => {
            let value = str_field(params, "value").unwrap_or_default();
            let ttl_ms = u64_field(params, "ttl_ms");
            kv::set_if_absent(key, value.as_bytes(), ttl_ms)
                .map(|stored| json!({ "stored": stored }))
        }
        Some("compare-and-set") => {
            let expected = str_field(params, "expected");
            let value = str_field(params, "value").unwrap_or_default();
            let ttl_ms = u64_field(params, "ttl_ms");
            kv::compare_and_set(key, expected.map(str::as_bytes), value.as_bytes(), ttl_ms)
                .map(|swapped| json!({ "swapped": swapped }))
        }
        other => return Err(Failure::Reject(format!("unknown kv op {other:?}"))),
    };
    let data = result.unwrap_or_else(|e| {
        let (variant, msg) = match e {
            kv::KvError::InvalidKey(m) => ("invalid-key", m),
            kv::KvError::TooLarge(m) => ("too-large", m),
            kv::KvError::NotANumber(m) => ("not-a-number", m),
        };
        json!({ "error": format!("{variant}: {msg}") })
    });
    Ok(vec![json_output("kv.result", &data)])
}

fn log_every_level() {
    use logging::Level;
    for (level, name) in [
        (Level::Trace, "trace"),
        (Level::Debug, "debug"),
        (Level::Info, "info"),
        (Level::Warn, "warn"),
        (Level::Error, "error"),
    ] {
        logging::log(level, &format!("scripted log at {name}"));
    }
    logging::log(Level::Info, &"x".repeat(1 << 20));
}
