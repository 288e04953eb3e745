//! Compiled-artifact cache: Cranelift output kept on disk so that restarts and
//! reloads of an unchanged plugin skip compilation.
//!
//! An entry is named by the plugin's content hash and the engine's compatibility
//! hash (wasmtime version and every setting that changes generated code), so a
//! changed plugin or engine never meets a stale artifact, and every engine with
//! the same settings (another process, a restart) shares the entries.
//!
//! # Only what this host wrote is loaded
//!
//! Deserializing is the one unsafe operation in Switchboard: machine code is
//! loaded as it is. A checksum beside an artifact would prove it intact, not who
//! wrote it: anyone able to write the folder could plant an artifact together
//! with its checksum and have their code run. So each artifact is authenticated:
//!
//! - On first use the cache makes a secret key, 32 random bytes in `cache.key`,
//!   owner-only (`0600`), written to a temporary file and linked into place only
//!   if no key is there yet, so that processes sharing the folder agree on one.
//! - Each artifact `<content hash>-<engine hash>.cwasm` is stored with
//!   `<…>.cwasm.hmac`: an HMAC-SHA256 under that key of the entry's name and the
//!   artifact's bytes (write to a temporary file, then rename). The name is
//!   covered so that a genuine artifact cannot be passed off as another plugin's.
//! - A lookup reads the artifact into memory, verifies its MAC and deserializes
//!   the very bytes it verified. An artifact whose MAC does not verify is refused
//!   with a warning and compiled again.
//! - The key itself is trusted only as a regular file (not a symlink) of
//!   exactly 32 bytes that belongs to this process's user and that nobody else
//!   may read or write. If it is unreadable or fails one of those checks, the
//!   cache is off for this runtime (a warning says why and what to do): nothing
//!   is loaded from it or stored in it, and every load compiles. A missing key is
//!   simply made anew, which also disowns every artifact already in the folder.
//!
//! A cache that cannot be read or written only ever costs a compilation, never a
//! load.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The file holding the cache's secret key, in the cache folder.
const KEY_FILE: &str = "cache.key";

/// Length of the secret key, in bytes.
const KEY_LEN: usize = 32;

/// Put before every MAC'd message, so that the key authenticates artifacts of
/// this format and nothing else.
const MAC_CONTEXT: &[u8] = b"switchboard compiled artifact v1\0";

type HmacSha256 = Hmac<Sha256>;

/// Where compiled components are kept.
pub(crate) struct ArtifactCache {
    dir: PathBuf,
    engine_key: String,
    /// The secret that authenticates artifacts; `None` when the key file could
    /// not be trusted, and the cache is then neither read nor written.
    key: Option<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("dir", &self.dir)
            .field("engine_key", &self.engine_key)
            .field("enabled", &self.key.is_some())
            .finish_non_exhaustive()
    }
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

/// Why the key file is not used.
#[derive(Debug, thiserror::Error)]
enum KeyError {
    #[error("cannot read it: {0}")]
    Unreadable(std::io::Error),
    #[error("cannot create it: {0}")]
    Uncreatable(std::io::Error),
    #[error("it is not a regular file")]
    NotAFile,
    #[error("it holds {0} bytes, not {KEY_LEN}")]
    WrongLength(u64),
    #[error("it belongs to user {owner}, not to this process's user {uid}")]
    NotOurs { owner: u32, uid: u32 },
    #[error("others may read or write it (mode {0:o}); it must be 600")]
    LoosePermissions(u32),
}

impl ArtifactCache {
    /// Opens (creating, owner-only) the cache folder for artifacts of `engine`,
    /// and its key (made on first use). A key that cannot be trusted turns the
    /// cache off with a warning; only a folder that cannot be made is an error.
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
        let key_path = dir.join(KEY_FILE);
        let key = match load_or_make_key(dir, &key_path) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(
                    path = %key_path.display(),
                    error = %e,
                    "the compiled-plugin cache is off: its key file cannot be trusted, so \
                     every plugin is compiled; remove the file to have a new key made"
                );
                None
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            engine_key,
            key,
        })
    }

    /// The entry's name, and the paths of its artifact and MAC.
    fn entry(&self, content_hash: &str) -> (String, PathBuf, PathBuf) {
        let name = format!("{content_hash}-{}", self.engine_key);
        let artifact = self.dir.join(format!("{name}.cwasm"));
        let mac = self.dir.join(format!("{name}.cwasm.hmac"));
        (name, artifact, mac)
    }

    /// The component for `wasm`, from the cache when an authentic artifact is
    /// there, otherwise compiled and stored. A cache that cannot be read or
    /// written only costs a compilation (and a warning), never a load.
    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        content_hash: &str,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let Some(key) = &self.key else {
            return Ok((Component::new(engine, wasm)?, CacheOutcome::Compiled));
        };
        let (name, artifact, mac) = self.entry(content_hash);
        if let Some(component) = load(engine, key, &name, &artifact, &mac) {
            return Ok((component, CacheOutcome::Hit));
        }
        let component = Component::new(engine, wasm)?;
        if let Err(e) = self.store(key, &component, &name, &artifact, &mac) {
            tracing::warn!(path = %artifact.display(), error = %e, "could not cache compiled plugin");
        }
        Ok((component, CacheOutcome::Compiled))
    }

    fn store(
        &self,
        key: &[u8; KEY_LEN],
        component: &Component,
        name: &str,
        artifact: &Path,
        mac: &Path,
    ) -> wasmtime::Result<()> {
        let bytes = component.serialize()?;
        let tag = hex::encode(mac_of(key, name, &bytes).finalize().into_bytes());
        write_atomically(&self.dir, artifact, &bytes)?;
        write_atomically(&self.dir, mac, tag.as_bytes())?;
        Ok(())
    }
}

/// The artifact of entry `name` if its MAC verifies under `key`; `None` (with a
/// warning when something is there but not authentic) otherwise.
fn load(
    engine: &Engine,
    key: &[u8; KEY_LEN],
    name: &str,
    artifact: &Path,
    mac: &Path,
) -> Option<Component> {
    // No MAC: nothing cached yet, or a write cut short (the artifact goes first).
    let tag = fs::read_to_string(mac).ok()?;
    let bytes = fs::read(artifact).ok()?;
    let authentic = hex::decode(tag.trim())
        .is_ok_and(|tag| mac_of(key, name, &bytes).verify_slice(&tag).is_ok());
    if !authentic {
        tracing::warn!(
            path = %artifact.display(),
            "cached artifact was not written by this host (its MAC does not verify); recompiling"
        );
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

/// The MAC of entry `name` with artifact `bytes`, ready to finalize or verify.
fn mac_of(key: &[u8; KEY_LEN], name: &str, bytes: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(MAC_CONTEXT);
    mac.update(name.as_bytes());
    mac.update(b"\0");
    mac.update(bytes);
    mac
}

/// The key in `path`, made first if there is none.
fn load_or_make_key(dir: &Path, path: &Path) -> Result<[u8; KEY_LEN], KeyError> {
    match read_key(path) {
        Err(KeyError::Unreadable(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let mut key = [0u8; KEY_LEN];
    rand::TryRng::try_fill_bytes(&mut rand::rngs::SysRng, &mut key)
        .map_err(|e| KeyError::Uncreatable(std::io::Error::other(e)))?;
    // A temporary file is created owner-only; linking it into place fails if
    // another process made a key meanwhile, and then theirs is the key.
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(KeyError::Uncreatable)?;
    tmp.write_all(&key).map_err(KeyError::Uncreatable)?;
    tmp.as_file().sync_all().map_err(KeyError::Uncreatable)?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(key),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => read_key(path),
        Err(e) => Err(KeyError::Uncreatable(e.error)),
    }
}

/// The key in `path`, if the file can be trusted with it.
fn read_key(path: &Path) -> Result<[u8; KEY_LEN], KeyError> {
    let mut file = open_no_follow(path).map_err(|e| {
        // Opening a symlink without following it fails with ELOOP.
        if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            KeyError::NotAFile
        } else {
            KeyError::Unreadable(e)
        }
    })?;
    // The checks are made on the file opened, not on the path again.
    let metadata = file.metadata().map_err(KeyError::Unreadable)?;
    if !metadata.is_file() {
        return Err(KeyError::NotAFile);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let uid = rustix::process::geteuid().as_raw();
        if metadata.uid() != uid {
            return Err(KeyError::NotOurs {
                owner: metadata.uid(),
                uid,
            });
        }
        if metadata.mode() & 0o077 != 0 {
            return Err(KeyError::LoosePermissions(metadata.mode() & 0o777));
        }
    }
    if metadata.len() != KEY_LEN as u64 {
        return Err(KeyError::WrongLength(metadata.len()));
    }
    let mut key = [0u8; KEY_LEN];
    file.read_exact(&mut key).map_err(KeyError::Unreadable)?;
    Ok(key)
}

#[cfg(unix)]
fn open_no_follow(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let no_follow = rustix::fs::OFlags::NOFOLLOW.bits();
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(i32::try_from(no_follow).unwrap_or_default())
        .open(path)
}

#[cfg(not(unix))]
fn open_no_follow(path: &Path) -> std::io::Result<fs::File> {
    fs::File::open(path)
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Loads machine code that this host compiled and authenticated itself.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `bytes` are exactly the bytes whose HMAC the caller verified under
    // this cache's secret key, which only this host holds: they are what it
    // serialized with `Component::serialize`. wasmtime verifies the engine
    // compatibility itself.
    unsafe { Component::deserialize(engine, bytes) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest component there is: the preamble, nothing else.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    fn new_engine() -> Engine {
        Engine::new(&wasmtime::Config::new()).unwrap()
    }

    fn load(cache: &ArtifactCache, engine: &Engine, wasm: &[u8]) -> CacheOutcome {
        cache
            .load_or_compile(engine, wasm, &sha256_hex(wasm))
            .unwrap()
            .1
    }

    fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn a_key_is_made_owner_only_and_artifacts_are_shared_by_engines_alike() {
        let dir = tempfile::tempdir().unwrap();
        let engine = new_engine();
        let cache = ArtifactCache::open(dir.path(), &engine).unwrap();
        assert_eq!(
            load(&cache, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        assert_eq!(load(&cache, &engine, EMPTY_COMPONENT), CacheOutcome::Hit);
        let key = fs::read(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(key.len(), KEY_LEN);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Another engine (a restart) with the same settings: same key, a hit.
        let again = new_engine();
        let reopened = ArtifactCache::open(dir.path(), &again).unwrap();
        assert_eq!(load(&reopened, &again, EMPTY_COMPONENT), CacheOutcome::Hit);
        assert_eq!(fs::read(dir.path().join(KEY_FILE)).unwrap(), key);
        assert_eq!(files(dir.path(), ".cwasm").len(), 1);
        assert_eq!(files(dir.path(), ".cwasm.hmac").len(), 1);
    }

    #[test]
    fn an_artifact_authenticated_under_another_key_is_refused() {
        let engine = new_engine();
        let theirs = tempfile::tempdir().unwrap();
        let ours = tempfile::tempdir().unwrap();
        let planted = ArtifactCache::open(theirs.path(), &engine).unwrap();
        assert_eq!(
            load(&planted, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        let cache = ArtifactCache::open(ours.path(), &engine).unwrap();
        // A genuine artifact, its MAC under the other key, and a plain checksum.
        for path in files(theirs.path(), ".cwasm")
            .into_iter()
            .chain(files(theirs.path(), ".cwasm.hmac"))
        {
            fs::copy(&path, ours.path().join(path.file_name().unwrap())).unwrap();
        }
        let artifact = &files(ours.path(), ".cwasm")[0];
        let sum = sha256_hex(&fs::read(artifact).unwrap());
        fs::write(format!("{}.sha256", artifact.display()), sum).unwrap();

        assert_eq!(
            load(&cache, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        // Its own artifact replaced the planted one.
        assert_eq!(load(&cache, &engine, EMPTY_COMPONENT), CacheOutcome::Hit);
    }

    #[test]
    fn a_genuine_artifact_under_another_entrys_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let engine = new_engine();
        let cache = ArtifactCache::open(dir.path(), &engine).unwrap();
        assert_eq!(
            load(&cache, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        // The same bytes and MAC, named for another plugin's content hash.
        let other = sha256_hex(b"another plugin");
        let (_, artifact, mac) = cache.entry(&sha256_hex(EMPTY_COMPONENT));
        let (_, moved_artifact, moved_mac) = cache.entry(&other);
        fs::copy(artifact, moved_artifact).unwrap();
        fs::copy(mac, moved_mac).unwrap();
        let (_, outcome) = cache
            .load_or_compile(&engine, EMPTY_COMPONENT, &other)
            .unwrap();
        assert_eq!(outcome, CacheOutcome::Compiled);
    }

    #[test]
    fn a_tampered_artifact_or_mac_is_recompiled() {
        let dir = tempfile::tempdir().unwrap();
        let engine = new_engine();
        let cache = ArtifactCache::open(dir.path(), &engine).unwrap();
        load(&cache, &engine, EMPTY_COMPONENT);
        let (_, artifact, mac) = cache.entry(&sha256_hex(EMPTY_COMPONENT));
        let mut bytes = fs::read(&artifact).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&artifact, &bytes).unwrap();
        assert_eq!(
            load(&cache, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        fs::write(&mac, "not hex at all").unwrap();
        assert_eq!(
            load(&cache, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        fs::remove_file(&mac).unwrap();
        assert_eq!(
            load(&cache, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        assert_eq!(load(&cache, &engine, EMPTY_COMPONENT), CacheOutcome::Hit);
    }

    #[test]
    fn a_missing_key_is_made_anew_and_disowns_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let engine = new_engine();
        let cache = ArtifactCache::open(dir.path(), &engine).unwrap();
        load(&cache, &engine, EMPTY_COMPONENT);
        let old = fs::read(dir.path().join(KEY_FILE)).unwrap();
        fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let cache = ArtifactCache::open(dir.path(), &engine).unwrap();
        assert_ne!(fs::read(dir.path().join(KEY_FILE)).unwrap(), old);
        assert_eq!(
            load(&cache, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        assert_eq!(load(&cache, &engine, EMPTY_COMPONENT), CacheOutcome::Hit);
    }

    /// A cache whose key cannot be trusted loads nothing and stores nothing,
    /// but every load still succeeds.
    fn assert_off(dir: &Path) {
        let engine = new_engine();
        let cache = ArtifactCache::open(dir, &engine).unwrap();
        assert!(cache.key.is_none(), "{cache:?}");
        let before = files(dir, ".cwasm");
        assert_eq!(
            load(&cache, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        assert_eq!(
            load(&cache, &engine, EMPTY_COMPONENT),
            CacheOutcome::Compiled
        );
        assert_eq!(files(dir, ".cwasm"), before, "nothing stored");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_others_may_read_turns_the_cache_off() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let engine = new_engine();
        let cache = ArtifactCache::open(dir.path(), &engine).unwrap();
        load(&cache, &engine, EMPTY_COMPONENT);
        let key = dir.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_key(&key),
            Err(KeyError::LoosePermissions(0o644))
        ));
        assert_off(dir.path());
        // Nothing repaired or replaced behind the operator's back.
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_key_turns_the_cache_off() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("key");
        let mut file = tempfile::NamedTempFile::new_in(elsewhere.path()).unwrap();
        file.write_all(&[7u8; KEY_LEN]).unwrap();
        file.persist(&target).unwrap();
        fs::create_dir_all(dir.path()).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(KEY_FILE)).unwrap();
        assert!(matches!(
            read_key(&dir.path().join(KEY_FILE)),
            Err(KeyError::NotAFile)
        ));
        assert_off(dir.path());
    }

    #[test]
    fn an_unreadable_or_malformed_key_turns_the_cache_off() {
        // A folder where the key should be cannot be read as one.
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(KEY_FILE)).unwrap();
        assert_off(dir.path());

        let dir = tempfile::tempdir().unwrap();
        let mut short = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        short.write_all(b"too short").unwrap();
        short.persist(dir.path().join(KEY_FILE)).unwrap();
        assert!(matches!(
            read_key(&dir.path().join(KEY_FILE)),
            Err(KeyError::WrongLength(9))
        ));
        assert_off(dir.path());
    }
}
