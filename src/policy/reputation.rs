//! Reputation per client: failures (relay attempts, unknown users, refused HELOs, failed
//! AUTH, protocol violations, other refusals) counted in a sliding window in the state
//! store. After `tarpit_after` every reply to the client is delayed; after `block_after` the
//! client is blocked (autoblacklist) for `block_for`. Spam traps block through here too.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{BoxFuture, Category, Check, CheckError, Context, Refusal, Stage, Verdict};
use crate::config::duration;
use crate::smtp::codec::Reply;
use crate::store::{Clock, Ns, Store, StoreError};

/// How a blocked client is answered right after connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BlockReply {
    /// `554 5.7.1` (default): the sender gives up.
    #[default]
    Reject,
    /// `421 4.7.1`: the sender retries later (useful while tuning).
    Tempfail,
}

/// `[checks.reputation]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReputationConfig {
    /// Default true.
    pub enabled: bool,
    /// The sliding window failures are counted in. Default "1h".
    #[serde(with = "duration")]
    pub window: Duration,
    /// Failures in `window` after which every reply to the client is delayed. 0 = never.
    /// Default 5.
    pub tarpit_after: u64,
    /// The delay before each reply (the banner included) to a tarpitted client. A
    /// tarpitted session costs a timer, not a thread. Default "3s".
    #[serde(with = "duration")]
    pub tarpit_delay: Duration,
    /// Failures in `window` after which the client is blocked. 0 = never. Default 15.
    pub block_after: u64,
    /// How long an autoblacklisted client stays blocked. Default "12h".
    #[serde(with = "duration")]
    pub block_for: Duration,
    /// `reject` (`554 5.7.1`, default) or `tempfail` (`421 4.7.1`).
    pub block_reply: BlockReply,
    /// Count IPv4 clients per /24 and IPv6 per /64 instead of per address. Default false.
    pub per_network: bool,
    /// What counts as a failure: outcome categories (`relay_attempt`, `unknown_user`,
    /// `helo_invalid`, `pregreet`, `blacklist`, `dnsbl`, `ptr`, `spf_fail`, `content`,
    /// `attachment`, …) plus `auth` (a failed AUTH) and `protocol` (a refused command).
    /// Default: relay_attempt, unknown_user, helo_invalid, pregreet, auth, protocol.
    pub count: Vec<String>,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Duration::from_secs(3600),
            tarpit_after: 5,
            tarpit_delay: Duration::from_secs(3),
            block_after: 15,
            block_for: Duration::from_secs(12 * 3600),
            block_reply: BlockReply::Reject,
            per_network: false,
            count: [
                "relay_attempt",
                "unknown_user",
                "helo_invalid",
                "pregreet",
                "auth",
                "protocol",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl ReputationConfig {
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if self.window.is_zero() {
            errors.push(format!("{key}.window: must be more than 0"));
        }
        if self.tarpit_delay > Duration::from_secs(60) {
            errors.push(format!(
                "{key}.tarpit_delay: at most 60s (clients time out after 5 minutes)"
            ));
        }
        if self.block_after > 0 && self.tarpit_after > self.block_after {
            errors.push(format!("{key}.tarpit_after: should not exceed block_after"));
        }
        errors
    }
}

/// A block in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// `trap:<address>` or `autoblacklist`.
    pub reason: String,
}

/// The run-time reputation service shared by the session (counting, tarpit) and the block
/// check.
#[derive(Debug)]
pub struct Reputation {
    pub config: ReputationConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl Reputation {
    pub fn new(config: ReputationConfig, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self { config, store, clock }
    }

    /// True when failures of this kind count.
    pub fn counts(&self, kind: &str) -> bool {
        self.config.enabled && self.config.count.iter().any(|c| c == kind)
    }

    /// The key a client is counted and blocked under.
    pub fn key(&self, ip: IpAddr) -> String {
        match ip.to_canonical() {
            IpAddr::V4(v4) if self.config.per_network => {
                let o = v4.octets();
                format!("{}.{}.{}.0/24", o[0], o[1], o[2])
            }
            IpAddr::V6(v6) if self.config.per_network => {
                let mut s = v6.segments();
                s[4..].fill(0);
                format!("{}/64", std::net::Ipv6Addr::from(s))
            }
            other => other.to_string(),
        }
    }

    fn window_ms(&self) -> u64 {
        (self.config.window.as_millis() as u64).max(1)
    }

    fn now_ms(&self) -> u64 {
        self.clock
            .now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Failures in the sliding window: this fixed window's count plus the previous one's,
    /// weighted by how much of it still overlaps (two counters per client, no lists).
    pub async fn failures(&self, ip: IpAddr) -> Result<u64, StoreError> {
        let key = self.key(ip);
        let (now, w) = (self.now_ms(), self.window_ms());
        let bucket = now / w;
        let cur = self.count_in(&key, bucket).await?;
        let prev = self.count_in(&key, bucket.saturating_sub(1)).await?;
        let overlap = 1.0 - ((now % w) as f64 / w as f64);
        Ok(cur + (prev as f64 * overlap).round() as u64)
    }

    async fn count_in(&self, key: &str, bucket: u64) -> Result<u64, StoreError> {
        Ok(self
            .store
            .get(Ns::Reputation, &format!("{key}|{bucket}"))
            .await?
            .and_then(|r| r.value.parse().ok())
            .unwrap_or(0))
    }

    /// Counts one failure; blocks the client when it reaches `block_after`. Returns the
    /// failures in the window, this one included.
    pub async fn record_failure(&self, ip: IpAddr) -> Result<u64, StoreError> {
        let key = self.key(ip);
        let bucket = self.now_ms() / self.window_ms();
        self.store
            .incr(
                Ns::Reputation,
                &format!("{key}|{bucket}"),
                1,
                self.config.window * 2,
            )
            .await?;
        let total = self.failures(ip).await?;
        if self.config.block_after > 0 && total >= self.config.block_after {
            self.block(ip, "autoblacklist", self.config.block_for).await?;
        }
        Ok(total)
    }

    /// Blocks a client for `ttl`: its counting key for the autoblacklist, its exact address
    /// for everything else (a trap hit says something about one host, not its network).
    pub async fn block(&self, ip: IpAddr, reason: &str, ttl: Duration) -> Result<(), StoreError> {
        let key = if reason == "autoblacklist" {
            self.key(ip)
        } else {
            ip.to_canonical().to_string()
        };
        tracing::warn!(client = %ip, key = %key, reason = %reason, hours = ttl.as_secs() / 3600, "Client blocked.");
        self.store.put(Ns::Block, &key, reason, Some(ttl)).await
    }

    pub async fn blocked(&self, ip: IpAddr) -> Result<Option<Block>, StoreError> {
        // Traps block the exact address; the autoblacklist blocks the counting key, which is
        // the network with `per_network`.
        let exact = ip.to_canonical().to_string();
        let network = self.key(ip);
        let keys = if network == exact {
            vec![exact]
        } else {
            vec![exact, network]
        };
        for key in keys {
            if let Some(r) = self.store.get(Ns::Block, &key).await? {
                return Ok(Some(Block { reason: r.value }));
            }
        }
        Ok(None)
    }

    /// Whether replies to this client are to be delayed.
    pub async fn tarpitted(&self, ip: IpAddr) -> Result<bool, StoreError> {
        if !self.config.enabled || self.config.tarpit_after == 0 {
            return Ok(false);
        }
        Ok(self.failures(ip).await? >= self.config.tarpit_after)
    }
}

/// Refuses blocked clients right after connect.
pub struct BlockCheck {
    reputation: Arc<Reputation>,
}

impl BlockCheck {
    pub fn new(reputation: Arc<Reputation>) -> Self {
        Self { reputation }
    }
}

impl Check for BlockCheck {
    fn name(&self) -> &'static str {
        "blocks"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Connect]
    }

    fn needs_io(&self) -> bool {
        true
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(async move {
            let ip = cx.session.peer.ip();
            let Some(block) = self
                .reputation
                .blocked(ip)
                .await
                .map_err(|e| CheckError(e.to_string()))?
            else {
                return Ok(Verdict::Pass);
            };
            let category = if block.reason.starts_with("trap") {
                Category::Trap
            } else {
                Category::Autoblacklist
            };
            let (code, enhanced) = match self.reputation.config.block_reply {
                BlockReply::Reject => (554, "5.7.1"),
                BlockReply::Tempfail => (421, "4.7.1"),
            };
            let reply = Reply::build(
                code,
                enhanced,
                format!(
                    "Client [{ip}] is blocked after repeated policy violations; try again later or contact the postmaster"
                ),
            );
            Ok(Verdict::Reject(Refusal { reply, category }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManualClock;

    #[test]
    fn keys() {
        let clock = ManualClock::new(std::time::SystemTime::now());
        let store: Arc<dyn Store> = Arc::new(NullStore);
        let mut cfg = ReputationConfig {
            per_network: true,
            ..Default::default()
        };
        let r = Reputation::new(cfg.clone(), store.clone(), clock.clone());
        assert_eq!(r.key("192.0.2.77".parse().unwrap()), "192.0.2.0/24");
        assert_eq!(r.key("2001:db8:1:2:3::4".parse().unwrap()), "2001:db8:1:2::/64");
        cfg.per_network = false;
        let r = Reputation::new(cfg, store, clock);
        assert_eq!(r.key("::ffff:192.0.2.77".parse().unwrap()), "192.0.2.77");
        assert!(r.counts("relay_attempt") && !r.counts("content"));
    }

    /// A store that is never asked (key and config tests only).
    #[derive(Debug)]
    struct NullStore;
    impl Store for NullStore {
        fn get<'a>(
            &'a self,
            _: Ns,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<crate::store::Record>, StoreError>> {
            Box::pin(async { Ok(None) })
        }
        fn put<'a>(
            &'a self,
            _: Ns,
            _: &'a str,
            _: &'a str,
            _: Option<Duration>,
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
        fn put_if_absent<'a>(
            &'a self,
            _: Ns,
            _: &'a str,
            _: &'a str,
            _: Option<Duration>,
        ) -> BoxFuture<'a, Result<bool, StoreError>> {
            Box::pin(async { Ok(true) })
        }
        fn delete<'a>(&'a self, _: Ns, _: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
            Box::pin(async { Ok(false) })
        }
        fn incr<'a>(
            &'a self,
            _: Ns,
            _: &'a str,
            by: u64,
            _: Duration,
        ) -> BoxFuture<'a, Result<u64, StoreError>> {
            Box::pin(async move { Ok(by) })
        }
        fn scan<'a>(
            &'a self,
            _: Ns,
            _: &'a str,
            _: usize,
        ) -> BoxFuture<'a, Result<Vec<(String, crate::store::Record)>, StoreError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn health(&self) -> crate::store::StoreHealth {
            crate::store::StoreHealth::default()
        }
    }
}
