//! The one seam between the SDK's capability modules (`kv`, `config`, `log`) and
//! whoever provides them.
//!
//! On wasm32 that is the Switchboard host, through the imports `wit-bindgen`
//! generated. Everywhere else it is the in-memory host of [`testing`](crate::testing),
//! so plugin logic runs natively (unit tests, benchmarks) without a host and
//! without ever touching a WIT import, which would abort outside wasm.

#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::*;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::host::*;

#[cfg(target_arch = "wasm32")]
mod wasm {
    use crate::bindings::{config, kv, logging};
    use crate::kv::KvError;
    use crate::log::Level;

    pub(crate) fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => logging::Level::Trace,
            Level::Debug => logging::Level::Debug,
            Level::Info => logging::Level::Info,
            Level::Warn => logging::Level::Warn,
            Level::Error => logging::Level::Error,
        };
        logging::log(level, message);
    }

    pub(crate) fn config_get(key: &str) -> Option<String> {
        config::get(key)
    }

    pub(crate) fn kv_get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        kv::get(key).map_err(from_wit)
    }

    pub(crate) fn kv_set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), KvError> {
        kv::set(key, value, ttl_ms).map_err(from_wit)
    }

    pub(crate) fn kv_delete(key: &str) -> Result<bool, KvError> {
        kv::delete(key).map_err(from_wit)
    }

    pub(crate) fn kv_incr(key: &str, delta: i64) -> Result<i64, KvError> {
        kv::incr(key, delta).map_err(from_wit)
    }

    pub(crate) fn kv_set_if_absent(
        key: &str,
        value: &[u8],
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        kv::set_if_absent(key, value, ttl_ms).map_err(from_wit)
    }

    pub(crate) fn kv_compare_and_set(
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        kv::compare_and_set(key, expected, value, ttl_ms).map_err(from_wit)
    }

    fn from_wit(err: kv::KvError) -> KvError {
        match err {
            kv::KvError::InvalidKey(m) => KvError::InvalidKey(m),
            kv::KvError::TooLarge(m) => KvError::TooLarge(m),
            kv::KvError::NotANumber(m) => KvError::NotANumber(m),
        }
    }
}
