//! WASI preview 2, linked because every wasip2 guest imports it (Rust's standard
//! library does, even when unused), and granted nothing: no preopened directories,
//! no environment, no arguments, no stdin or stdout (they read empty and write
//! nowhere), no network (TCP, UDP and name lookup all refused). Clocks and random
//! numbers are WASI's defaults: they reveal nothing about the host.
//!
//! Stderr goes nowhere either, except that its last few KiB per event are kept in
//! host memory: that is where a guest writes its panic message, and the host puts
//! it in the failure's reason. The guest cannot read any of it back.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::runtime::store::InstanceState;

/// Bytes of stderr kept per event.
const STDERR_TAIL: usize = 4096;

pub(crate) fn link(linker: &mut Linker<InstanceState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)
}

/// WASI state for one instance: an empty context.
pub(crate) struct WasiState {
    ctx: WasiCtx,
    table: ResourceTable,
    pub(crate) stderr: StderrTail,
}

impl WasiState {
    pub(crate) fn sandboxed() -> Self {
        let stderr = StderrTail::default();
        let ctx = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            ctx,
            table: ResourceTable::new(),
            stderr,
        }
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// The last [`STDERR_TAIL`] bytes a guest wrote to stderr.
#[derive(Clone, Default)]
pub(crate) struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

impl StderrTail {
    fn push(&self, bytes: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let keep = &bytes[bytes.len().saturating_sub(STDERR_TAIL)..];
        let overflow = (tail.len() + keep.len()).saturating_sub(STDERR_TAIL);
        tail.drain(..overflow);
        tail.extend(keep);
    }

    /// Forgets what was written (at the start of each event).
    pub(crate) fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// What the guest said on stderr as it aborted, on one line, as the failure's
    /// reason; `None` if it said nothing. It reads what the usual runtimes print:
    ///
    /// - Rust: the `panicked at` line and the panic message;
    /// - Python (componentize-py): the exception of the last traceback, and the
    ///   outermost frame (the handler's own code);
    /// - JavaScript (componentize-js): the exception message before `Stack:`,
    ///   and the first frame;
    /// - anything else (C `assert`, `abort()` after a message): the last line.
    pub(crate) fn panic_message(&self) -> Option<String> {
        let bytes: Vec<u8> = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        let message = python_exception(&text)
            .or_else(|| rust_panic(&text))
            .or_else(|| js_exception(&text))
            .or_else(|| last_words(&text))?;
        Some(truncate(message, 1024))
    }
}

/// Non-empty trimmed lines of `text`.
fn lines(text: &str) -> impl DoubleEndedIterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

fn rust_panic(text: &str) -> Option<String> {
    let start = text.rfind("panicked at ")?;
    Some(
        lines(&text[start..])
            .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// `Traceback (most recent call last):`, frames (`File "...", line n, in f` and
/// the source line, when there is one), then `Type: message`.
fn python_exception(text: &str) -> Option<String> {
    let start = text.rfind("Traceback (most recent call last):")?;
    let block = &text[start..];
    // componentize-py panics after printing the traceback: stop there.
    let block = &block[..block.find("\nthread '").unwrap_or(block.len())];
    let exception = lines(block).last()?;
    let frame = lines(block).find(|l| l.starts_with("File "));
    Some(match frame {
        Some(frame) if exception != frame => {
            format!("uncaught Python exception: {exception} ({frame})")
        }
        _ => format!("uncaught Python exception: {exception}"),
    })
}

/// `<message>`, `Stack:`, frames.
fn js_exception(text: &str) -> Option<String> {
    let at = text.rfind("\nStack:\n")?;
    let message = lines(&text[..at]).last()?;
    let frame = lines(&text[at + "\nStack:\n".len()..]).next();
    Some(match frame {
        Some(frame) => format!("uncaught JavaScript exception: {message} (at {frame})"),
        None => format!("uncaught JavaScript exception: {message}"),
    })
}

fn last_words(text: &str) -> Option<String> {
    let line = lines(text)
        .rev()
        .find(|l| !l.starts_with("Redirecting call to abort()"))?;
    Some(format!("the guest aborted after writing: {line}"))
}

fn truncate(mut message: String, max: usize) -> String {
    if message.len() > max {
        let mut end = max;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl OutputStream for StderrTail {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl AsyncWrite for StderrTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_tail_and_finds_the_panic() {
        let tail = StderrTail::default();
        tail.push(&vec![b'x'; 10_000]);
        tail.push(
            b"\nthread '<unnamed>' panicked at src/lib.rs:10:5:\nscripted panic\n\
              note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n",
        );
        assert_eq!(
            tail.panic_message().as_deref(),
            Some("panicked at src/lib.rs:10:5: scripted panic")
        );
        assert!(tail.0.lock().unwrap().len() <= STDERR_TAIL);
        tail.clear();
        assert_eq!(tail.panic_message(), None);
    }

    #[test]
    fn reads_python_tracebacks() {
        let tail = StderrTail::default();
        tail.push(
            b"Traceback (most recent call last):\n  File \"/0/app.py\", line 12, in handle\n  \
              File \"/python/json/decoder.py\", line 363, in raw_decode\n\
              json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)\n\n\
              thread '<unnamed>' (1) panicked at runtime/src/lib.rs:1293:29:\n\
              Python function threw an unexpected exception\n\
              note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n",
        );
        assert_eq!(
            tail.panic_message().as_deref(),
            Some(
                "uncaught Python exception: json.decoder.JSONDecodeError: Expecting value: \
                 line 1 column 1 (char 0) (File \"/0/app.py\", line 12, in handle)"
            )
        );
    }

    #[test]
    fn reads_javascript_exceptions() {
        let tail = StderrTail::default();
        tail.push(
            b"TypeError: data is null\nStack:\n  handle@app.js:3:5\n  export_handle@initializer.js:1:1\n\n\
              Redirecting call to abort() to mozalloc_abort\n\n",
        );
        assert_eq!(
            tail.panic_message().as_deref(),
            Some("uncaught JavaScript exception: TypeError: data is null (at handle@app.js:3:5)")
        );
    }

    #[test]
    fn otherwise_the_last_line_and_never_more_than_a_kib() {
        let tail = StderrTail::default();
        tail.push(b"starting\nAssertion failed: n > 0 (greeter.c: main: 12)\n");
        assert_eq!(
            tail.panic_message().as_deref(),
            Some("the guest aborted after writing: Assertion failed: n > 0 (greeter.c: main: 12)")
        );
        tail.clear();
        tail.push("é".repeat(1500).as_bytes());
        let message = tail.panic_message().unwrap();
        assert!(message.len() <= 1024, "{}", message.len());
    }
}
