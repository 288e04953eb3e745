//! The mover: puts due retries into their plugin's stream and due delayed
//! outputs into their exchange's stream, and declares the topology again when
//! Redis answers after an outage.
//!
//! Each move is one Lua script ([`MOVE_DUE`]): take the members due, `XADD`
//! each to the stream it names, remove it — atomic on the server, so every
//! replica may run it and none moves a member twice. What waits survives a
//! restart of the router (it is in Redis) and of Redis (with its persistence).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::link::Backoff;
use super::settle::now_ms;
use super::{Inner, lock};

/// How often due members are looked for: the lateness a retry or delayed
/// output may have.
const TICK: Duration = Duration::from_millis(100);

/// Members moved per set per run.
const BATCH: usize = 500;

/// KEYS[1]: the sorted set. ARGV: 1 = now (ms), 2 = most to move, 3 = MAXLEN of
/// the target streams. Each member is netstrings: a unique id, the target
/// stream, then XADD's field-value pairs (see `entry::pack`). Returns
/// {moved, malformed} (a malformed member is removed).
pub const MOVE_DUE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved, bad = 0, 0
for _, member in ipairs(due) do
  local parts, i, n, ok = {}, 1, #member, true
  while i <= n do
    local colon = string.find(member, ':', i, true)
    if not colon then ok = false; break end
    local len = tonumber(string.sub(member, i, colon - 1))
    if not len or string.sub(member, colon + len + 1, colon + len + 1) ~= ',' then ok = false; break end
    parts[#parts + 1] = string.sub(member, colon + 1, colon + len)
    i = colon + len + 2
  end
  redis.call('ZREM', KEYS[1], member)
  if ok and #parts >= 4 and #parts % 2 == 0 then
    local args = {parts[2], 'MAXLEN', '~', ARGV[3], '*'}
    for j = 3, #parts do args[#args + 1] = parts[j] end
    redis.call('XADD', unpack(args))
    moved = moved + 1
  else
    bad = bad + 1
  end
end
return {moved, bad}
";

/// Runs until `stop` is dropped.
pub(super) fn run(inner: &Arc<Inner>, stop: &Receiver<()>) {
    let script = redis::Script::new(MOVE_DUE);
    let mut backoff = Backoff::new();
    let mut pause = TICK;
    loop {
        match stop.recv_timeout(pause) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let declared = lock(&inner.status).declared;
        if !declared && inner.declare(None).is_err() {
            pause = backoff.pause();
            continue;
        }
        match move_due(inner, &script) {
            Ok(()) => {
                inner.record(Ok(()));
                backoff.reset();
                pause = TICK;
            }
            Err(why) => {
                tracing::warn!(error = %why, "moving due retries and delayed outputs failed");
                inner.record(Err(&why));
                pause = backoff.pause();
            }
        }
    }
}

fn move_due(inner: &Inner, script: &redis::Script) -> Result<(), String> {
    let mut sets = vec![inner.keys.delayed()];
    {
        let routing = inner.routing.load();
        sets.extend(
            routing
                .topology
                .queues
                .iter()
                .map(|q| inner.keys.retries(&q.plugin)),
        );
    }
    sets.extend(lock(&inner.retired).keys().map(|p| inner.keys.retries(p)));
    let now = now_ms();
    let max = inner.settings.stream_max_length;
    inner
        .link
        .run(|con| {
            for set in &sets {
                let (moved, bad): (u64, u64) = script
                    .key(set)
                    .arg(now)
                    .arg(BATCH)
                    .arg(max)
                    .invoke(con)?;
                if bad > 0 {
                    tracing::error!(set = %set, bad, "malformed members removed from a waiting set");
                }
                if moved > 0 {
                    tracing::debug!(set = %set, moved, "due members moved to their streams");
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())
}
