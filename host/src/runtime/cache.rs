//! Compiled-artifact cache: Cranelift output kept on disk so that restarts and
//! reloads of an unchanged plugin skip compilation.
//!
//! An entry is named by the plugin's content hash and the engine's compatibility
//! hash (wasmtime version and every setting that changes generated code), so a
//! changed plugin or engine never meets a stale artifact. Deserializing is the
//! one unsafe operation in Switchboard: machine code is loaded as it is. So only
//! artifacts this host wrote are ever loaded: each is written with a checksum
//! beside it (write to a temp file, then rename), read into memory, checked
//! against that checksum, and deserialized from the very bytes that were checked.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where compiled components are kept.
#[derive(Debug)]
pub(crate) struct ArtifactCache {
    dir: PathBuf,
    engine_key: String,
}

/// What a lookup did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded a previously compiled artifact.
    Hit,
    /// Compiled now (and stored, when a cache is configured).
    Compiled,
}

/// Feeds `Hash` output into SHA-256, for a hash that is stable across runs.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl ArtifactCache {
    /// Opens (creating, owner-only) the cache folder for artifacts of `engine`.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hex::encode(&hasher.0.finalize()[..8]);
        Ok(Self {
            dir: dir.to_path_buf(),
            engine_key,
        })
    }

    fn paths(&self, content_hash: &str) -> (PathBuf, PathBuf) {
        let base = format!("{content_hash}-{}", self.engine_key);
        (
            self.dir.join(format!("{base}.cwasm")),
            self.dir.join(format!("{base}.cwasm.sha256")),
        )
    }

    /// The component for `wasm`, from the cache when a checked artifact is there,
    /// otherwise compiled and stored. A cache that cannot be read or written only
    /// costs a compilation (and a warning), never a load.
    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        content_hash: &str,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let (artifact, sum) = self.paths(content_hash);
        if let Some(component) = self.load(engine, &artifact, &sum) {
            return Ok((component, CacheOutcome::Hit));
        }
        let component = Component::new(engine, wasm)?;
        if let Err(e) = self.store(&component, &artifact, &sum) {
            tracing::warn!(path = %artifact.display(), error = %e, "could not cache compiled plugin");
        }
        Ok((component, CacheOutcome::Compiled))
    }

    fn load(&self, engine: &Engine, artifact: &Path, sum: &Path) -> Option<Component> {
        let expected = fs::read_to_string(sum).ok()?;
        let bytes = fs::read(artifact).ok()?;
        if sha256_hex(&bytes) != expected.trim() {
            tracing::warn!(path = %artifact.display(), "cached artifact does not match its checksum; recompiling");
            return None;
        }
        match deserialize(engine, &bytes) {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %artifact.display(), error = %e, "cached artifact refused; recompiling");
                None
            }
        }
    }

    fn store(&self, component: &Component, artifact: &Path, sum: &Path) -> wasmtime::Result<()> {
        let bytes = component.serialize()?;
        write_atomically(&self.dir, artifact, &bytes)?;
        write_atomically(&self.dir, sum, sha256_hex(&bytes).as_bytes())?;
        Ok(())
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Loads machine code that this host compiled and checksummed itself.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `bytes` are exactly the bytes this host serialized with
    // `Component::serialize` and whose SHA-256 it recorded beside them (checked
    // by the caller); wasmtime verifies the engine compatibility itself.
    unsafe { Component::deserialize(engine, bytes) }
}
