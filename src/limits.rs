//! Per-client connection limits: concurrent connections and connection rate per IP (or per
//! network), kept in sharded maps so admission never takes a process-wide lock. The state
//! outlives reloads; the limits themselves come from the current configuration.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::duration;

const SHARDS: usize = 64;
/// Entries per shard before idle ones are swept, so a flood of distinct addresses costs
/// bounded memory.
const SWEEP_AT: usize = 4096;

/// `[checks.limits]`: per-client limits. Whitelisted clients (lists) are exempt.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent connections from one client; more get `421 4.7.0`. 0 = no limit.
    /// Default 20.
    pub max_connections_per_ip: u32,
    /// New connections from one client per `rate_window`; more get `421 4.7.0`. 0 = no
    /// limit. Default 0.
    pub max_connection_rate: u32,
    /// The window for `max_connection_rate`. Default "1m".
    #[serde(with = "duration")]
    pub rate_window: Duration,
    /// Count IPv6 clients per /64 (one customer's whole allocation). Default true.
    pub ipv6_per_64: bool,
    /// Recipients per session over all its transactions; more get `452 4.5.3`. 0 = no
    /// limit. Default 1000.
    pub max_recipients_per_session: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_ip: 20,
            max_connection_rate: 0,
            rate_window: Duration::from_secs(60),
            ipv6_per_64: true,
            max_recipients_per_session: 1000,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if self.max_connection_rate > 0 && self.rate_window.is_zero() {
            errors.push(format!("{key}.rate_window: must be more than 0"));
        }
        errors
    }
}

#[derive(Debug, Default)]
struct Entry {
    active: u32,
    /// Start of the current rate window and connections seen in it.
    window_start: Option<Instant>,
    in_window: u32,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Concurrency(u32),
    Rate(u32),
}

/// Connection accounting per client key.
#[derive(Debug)]
pub struct ConnectionLimiter {
    shards: Vec<Mutex<HashMap<IpAddr, Entry>>>,
}

impl Default for ConnectionLimiter {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

/// Holds one admitted connection; dropping it releases the slot.
#[derive(Debug)]
pub struct Admission {
    limiter: Arc<ConnectionLimiter>,
    key: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Ok(mut shard) = self.limiter.shard(&self.key).lock()
            && let Some(e) = shard.get_mut(&self.key)
        {
            e.active = e.active.saturating_sub(1);
        }
    }
}

impl ConnectionLimiter {
    fn shard(&self, key: &IpAddr) -> &Mutex<HashMap<IpAddr, Entry>> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// The accounting key: the address, or its /64 for IPv6 when configured.
    pub fn key(ip: IpAddr, config: &LimitsConfig) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) if config.ipv6_per_64 => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::from(seg)
            }
            other => other,
        }
    }

    /// Admits a connection from `ip` or says which limit it exceeds.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, config: &LimitsConfig) -> Result<Admission, Refused> {
        let key = Self::key(ip, config);
        let now = Instant::now();
        let Ok(mut shard) = self.shard(&key).lock() else {
            // A poisoned shard only loses accounting; never refuse mail because of it.
            return Ok(Admission {
                limiter: self.clone(),
                key,
            });
        };
        if shard.len() >= SWEEP_AT {
            shard.retain(|_, e| {
                e.active > 0
                    || e.window_start
                        .is_some_and(|s| now.duration_since(s) < config.rate_window)
            });
        }
        let e = shard.entry(key).or_default();
        if config.max_connections_per_ip > 0 && e.active >= config.max_connections_per_ip {
            return Err(Refused::Concurrency(config.max_connections_per_ip));
        }
        if config.max_connection_rate > 0 {
            match e.window_start {
                Some(start) if now.duration_since(start) < config.rate_window => {
                    if e.in_window >= config.max_connection_rate {
                        return Err(Refused::Rate(config.max_connection_rate));
                    }
                    e.in_window += 1;
                }
                _ => {
                    e.window_start = Some(now);
                    e.in_window = 1;
                }
            }
        }
        e.active += 1;
        Ok(Admission {
            limiter: self.clone(),
            key,
        })
    }

    /// Current connections from `ip`'s key (for status pages and tests).
    pub fn active(&self, ip: IpAddr, config: &LimitsConfig) -> u32 {
        let key = Self::key(ip, config);
        self.shard(&key)
            .lock()
            .ok()
            .and_then(|s| s.get(&key).map(|e| e.active))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn concurrency_and_rate() {
        let l = Arc::new(ConnectionLimiter::default());
        let cfg = LimitsConfig {
            max_connections_per_ip: 2,
            max_connection_rate: 3,
            ..Default::default()
        };
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = l.admit(ip, &cfg).unwrap();
        let _b = l.admit(ip, &cfg).unwrap();
        assert_eq!(l.admit(ip, &cfg).unwrap_err(), Refused::Concurrency(2));
        drop(a);
        assert_eq!(l.active(ip, &cfg), 1);
        let _c = l.admit(ip, &cfg).unwrap();
        // Three in this window already.
        drop(_c);
        assert_eq!(l.admit(ip, &cfg).unwrap_err(), Refused::Rate(3));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(l.admit(ip, &cfg).is_ok());
        // Another client is not affected.
        assert!(l.admit("192.0.2.2".parse().unwrap(), &cfg).is_ok());
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_v4_as_v4() {
        let cfg = LimitsConfig::default();
        let a = ConnectionLimiter::key("2001:db8:1:2:aaaa::1".parse().unwrap(), &cfg);
        let b = ConnectionLimiter::key("2001:db8:1:2:bbbb::9".parse().unwrap(), &cfg);
        assert_eq!(a, b);
        assert_eq!(
            ConnectionLimiter::key("::ffff:192.0.2.1".parse().unwrap(), &cfg),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }
}
