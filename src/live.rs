//! The registry of sessions in progress, for the admin status page and console: who is
//! connected, at which stage, for how long, and whether the client is tarpitted. Sharded
//! so registering a connection never takes a process-wide lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

const SHARDS: usize = 32;

/// Where a session is; updated by the session as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveStage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    Relay,
}

impl LiveStage {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Helo,
            2 => Self::Mail,
            3 => Self::Rcpt,
            4 => Self::Data,
            5 => Self::Relay,
            _ => Self::Connect,
        }
    }
}

/// One live session's shared state.
#[derive(Debug)]
pub struct LiveEntry {
    pub id: String,
    pub client: SocketAddr,
    pub started: SystemTime,
    stage: AtomicU8,
    tarpitted: AtomicBool,
}

impl LiveEntry {
    pub fn set_stage(&self, stage: LiveStage) {
        self.stage.store(stage as u8, Ordering::Relaxed);
    }

    pub fn set_tarpitted(&self) {
        self.tarpitted.store(true, Ordering::Relaxed);
    }
}

/// A snapshot of one live session.
#[derive(Debug, Clone, Serialize)]
pub struct LiveSession {
    pub id: String,
    pub client: String,
    pub stage: LiveStage,
    pub seconds: u64,
    pub tarpitted: bool,
}

/// All sessions in progress.
#[derive(Debug)]
pub struct LiveSessions {
    shards: Vec<Mutex<HashMap<String, Arc<LiveEntry>>>>,
}

impl Default for LiveSessions {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

/// Removes the session from the registry when dropped.
#[derive(Debug)]
pub struct LiveGuard {
    registry: Arc<LiveSessions>,
    pub entry: Arc<LiveEntry>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut shard) = self.registry.shard(&self.entry.id).lock() {
            shard.remove(&self.entry.id);
        }
    }
}

impl LiveSessions {
    fn shard(&self, id: &str) -> &Mutex<HashMap<String, Arc<LiveEntry>>> {
        let h = id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        &self.shards[h % SHARDS]
    }

    /// Registers a session until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, id: &str, client: SocketAddr) -> LiveGuard {
        let entry = Arc::new(LiveEntry {
            id: id.to_string(),
            client,
            started: SystemTime::now(),
            stage: AtomicU8::new(0),
            tarpitted: AtomicBool::new(false),
        });
        if let Ok(mut shard) = self.shard(id).lock() {
            shard.insert(id.to_string(), entry.clone());
        }
        LiveGuard {
            registry: self.clone(),
            entry,
        }
    }

    /// Every live session, longest-running first, at most `limit`.
    pub fn list(&self, limit: usize) -> Vec<LiveSession> {
        let mut all: Vec<LiveSession> = self
            .shards
            .iter()
            .filter_map(|s| s.lock().ok())
            .flat_map(|s| {
                s.values()
                    .map(|e| LiveSession {
                        id: e.id.clone(),
                        client: e.client.to_string(),
                        stage: LiveStage::from_u8(e.stage.load(Ordering::Relaxed)),
                        seconds: e.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
                        tarpitted: e.tarpitted.load(Ordering::Relaxed),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by(|a, b| b.seconds.cmp(&a.seconds).then_with(|| a.id.cmp(&b.id)));
        all.truncate(limit);
        all
    }

    pub fn count(&self) -> usize {
        self.shards
            .iter()
            .filter_map(|s| s.lock().ok())
            .map(|s| s.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_update_and_drop() {
        let live = Arc::new(LiveSessions::default());
        let g = live.register("a", "192.0.2.1:25".parse().unwrap());
        let _h = live.register("b", "192.0.2.2:25".parse().unwrap());
        g.entry.set_stage(LiveStage::Data);
        g.entry.set_tarpitted();
        assert_eq!(live.count(), 2);
        let a = live.list(10).into_iter().find(|s| s.id == "a").unwrap();
        assert_eq!((a.stage, a.tarpitted), (LiveStage::Data, true));
        drop(g);
        assert_eq!(live.count(), 1);
    }
}
