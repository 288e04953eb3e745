//! The wasmtime side of Switchboard: one engine for the process, plugins compiled
//! from `.wasm` files and checked against the `handler` world, and every event run
//! in a sandbox with wall-time, memory and stack limits.
//!
//! Lifecycle: a [`Runtime`] owns the engine, the linker with every host
//! capability, the artifact cache and the epoch ticker thread (dropping the last
//! clone of the runtime stops it). [`Runtime::load`] turns bytes into a
//! [`Plugin`]; [`Plugin::handle`] runs one event on the calling thread.

mod bindings;
mod cache;
pub(crate) mod capability;
mod failure;
mod limits;
mod plugin;
mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use bindings::{Event, Output};
pub use cache::CacheOutcome;
pub use capability::kv::{MAX_KEY, MAX_VALUE};
pub use capability::logging::{LogLine, RECENT_LINES};
pub use failure::{Failure, MAX_REASON, excerpt};
pub use limits::{DEFAULT_MAX_DELAY, Limits};
pub use plugin::Plugin;

use crate::kv::KvStore;
use cache::ArtifactCache;
use capability::kv::KvState;
use plugin::PluginParts;
use store::{InstanceState, PluginContext};

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Use wasmtime's pooling allocator (pre-reserved instance slots).
    pub pooling: bool,
    /// Instances that may exist at once across all plugins (pooling slots).
    pub max_instances: u32,
    /// Wasm stack per call, in bytes; deeper recursion traps as a stack overflow.
    pub max_stack: usize,
    /// Epoch tick: the granularity of wall-time limits.
    pub epoch_tick: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            pooling: true,
            max_instances: 256,
            max_stack: 512 << 10,
            epoch_tick: Duration::from_millis(5),
        }
    }
}

/// Largest memory limit a plugin may ask for (a 32-bit linear memory's reach).
pub const MAX_MEMORY_LIMIT: u64 = 4 << 30;

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create the WebAssembly engine: {0}")]
    Engine(String),
    #[error("cannot link host capabilities: {0}")]
    Link(String),
    #[error("cannot use {} as the compiled-plugin cache: {source}", path.display())]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a plugin could not be loaded. Each message names the plugin and says what
/// is wrong in one sentence; the running version, if any, is unaffected.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {plugin:?}: cannot read {}: {source}", path.display())]
    Read {
        plugin: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {plugin:?}: not a WebAssembly file (it does not start with \"\\0asm\")")]
    NotWasm { plugin: String },
    #[error(
        "plugin {plugin:?}: a core WebAssembly module, not a component; build it for \
         wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule { plugin: String },
    #[error("plugin {plugin:?}: invalid component: {message}")]
    Invalid { plugin: String, message: String },
    #[error(
        "plugin {plugin:?}: does not implement the switchboard:plugin/handler world: {message}"
    )]
    WrongWorld { plugin: String, message: String },
    #[error("plugin {plugin:?}: {message}")]
    Limits { plugin: String, message: String },
}

/// What a plugin is made of, before loading.
pub struct PluginSpec {
    /// Name: the plugin's namespace for state and configuration.
    pub name: String,
    /// The `.wasm` bytes.
    pub wasm: Vec<u8>,
    /// Limits to run under.
    pub limits: Limits,
    /// Configuration values the plugin can read with `config.get`.
    pub config: BTreeMap<String, String>,
    /// Where its key-value state lives.
    pub kv: Arc<dyn KvStore>,
}

impl PluginSpec {
    /// A spec for the file at `path`, with default limits and no configuration.
    pub fn from_file(
        name: impl Into<String>,
        path: &Path,
        kv: Arc<dyn KvStore>,
    ) -> Result<Self, LoadError> {
        let name = name.into();
        let wasm = std::fs::read(path).map_err(|source| LoadError::Read {
            plugin: name.clone(),
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            name,
            wasm,
            limits: Limits::default(),
            config: BTreeMap::new(),
            kv,
        })
    }
}

/// The engine, linker and cache shared by every plugin. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<InstanceState>,
    cache: Option<ArtifactCache>,
    config: RuntimeConfig,
    pooling: bool,
    recent: Arc<capability::logging::RecentLogs>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.inner.config)
            .field("pooling", &self.inner.pooling)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine (falling back from the pooling allocator when the
    /// machine cannot reserve its address space), links the capabilities and
    /// starts the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let (engine, pooling) = build_engine(&config)?;
        let mut linker = Linker::new(&engine);
        capability::link(&mut linker).map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        let cache =
            match &config.cache_dir {
                Some(dir) => Some(ArtifactCache::open(dir, &engine).map_err(|source| {
                    RuntimeError::Cache {
                        path: dir.clone(),
                        source,
                    }
                })?),
                None => None,
            };
        let ticker = EpochTicker::start(engine.clone(), config.epoch_tick);
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linker,
                cache,
                config,
                pooling,
                recent: Arc::default(),
                _ticker: ticker,
            }),
        })
    }

    /// Whether the pooling allocator is in use.
    /// The newest lines `plugin` logged (at most [`RECENT_LINES`]), oldest
    /// first.
    pub fn recent_logs(&self, plugin: &str) -> Vec<LogLine> {
        self.inner.recent.recent(plugin)
    }

    pub fn pooling(&self) -> bool {
        self.inner.pooling
    }

    /// Compiles (or loads from the cache) and type-checks a plugin. Compilation
    /// takes milliseconds to seconds: call this off the event path.
    pub fn load(&self, spec: PluginSpec) -> Result<(Plugin, CacheOutcome), LoadError> {
        let PluginSpec {
            name,
            wasm,
            limits,
            config,
            kv,
        } = spec;
        if limits.memory > MAX_MEMORY_LIMIT {
            return Err(LoadError::Limits {
                plugin: name,
                message: format!(
                    "memory limit {} is over the maximum {MAX_MEMORY_LIMIT}",
                    limits.memory
                ),
            });
        }
        check_header(&name, &wasm)?;
        let version = cache::sha256_hex(&wasm);
        let (component, outcome) =
            self.compile(&wasm, &version)
                .map_err(|e| LoadError::Invalid {
                    plugin: name.clone(),
                    message: format!("{e:#}"),
                })?;
        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            plugin: name.clone(),
            message: format!("{e:#}"),
        };
        let instance_pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = bindings::HandlerPre::new(instance_pre).map_err(wrong_world)?;
        let context = Arc::new(PluginContext {
            name: name.as_str().into(),
            config: Arc::new(config),
            kv: KvState { store: kv },
            log_limit: capability::logging::RateLimit::default(),
            recent: self.inner.recent.clone(),
        });
        let plugin = Plugin::new(PluginParts {
            context,
            version: version[..12].to_string(),
            engine: self.inner.engine.clone(),
            pre,
            limits,
            epoch_tick: self.inner.config.epoch_tick,
            max_stack: self.inner.config.max_stack,
        });
        Ok((plugin, outcome))
    }

    fn compile(&self, wasm: &[u8], hash: &str) -> wasmtime::Result<(Component, CacheOutcome)> {
        match &self.inner.cache {
            Some(cache) => cache.load_or_compile(&self.inner.engine, wasm, hash),
            None => Ok((
                Component::new(&self.inner.engine, wasm)?,
                CacheOutcome::Compiled,
            )),
        }
    }
}

/// The version a plugin built from `wasm` reports: a short content hash.
pub fn content_version(wasm: &[u8]) -> String {
    cache::sha256_hex(wasm)[..12].to_string()
}

/// Refuses non-wasm bytes and core modules with a sentence that says which.
fn check_header(plugin: &str, wasm: &[u8]) -> Result<(), LoadError> {
    if !wasm.starts_with(b"\0asm") || wasm.len() < 8 {
        return Err(LoadError::NotWasm {
            plugin: plugin.into(),
        });
    }
    // Bytes 4..8: version 1 with layer 0 is a core module; components are layer 1.
    if wasm[4..8] == [1, 0, 0, 0] {
        return Err(LoadError::CoreModule {
            plugin: plugin.into(),
        });
    }
    Ok(())
}

fn build_engine(config: &RuntimeConfig) -> Result<(Engine, bool), RuntimeError> {
    let mut base = Config::new();
    base.wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_stack)
        .parallel_compilation(true);
    if config.pooling {
        let n = config.max_instances;
        let mut pool = PoolingAllocationConfig::new();
        // A Rust component has one core instance with memory, plus a few small
        // shim instances without.
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .max_memory_size(usize::try_from(MAX_MEMORY_LIMIT).unwrap_or(usize::MAX));
        let mut pooled = base.clone();
        pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        match Engine::new(&pooled) {
            Ok(engine) => return Ok((engine, true)),
            Err(e) => tracing::warn!(
                error = %e,
                "pooling allocator unavailable (address space?); allocating instances on demand"
            ),
        }
    }
    Engine::new(&base)
        .map(|e| (e, false))
        .map_err(|e| RuntimeError::Engine(format!("{e:#}")))
}

/// The thread that advances the engine's epoch, which is what interrupts a guest
/// at its deadline. Stops when dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("switchboard-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| tracing::error!(error = %e, "cannot start the epoch ticker; timeouts will not fire"))
            .ok();
        Self { stop, thread }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked_before_compiling() {
        assert!(matches!(
            check_header("p", b"hello world"),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header("p", b"\0asm"),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header("p", b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule { .. })
        ));
        assert!(check_header("p", b"\0asm\x0d\0\x01\0").is_ok());
    }
}
