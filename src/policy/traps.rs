//! Spam traps: addresses no legitimate sender uses. A client that sends to one is refused
//! at RCPT — with the same reply as an unknown user, so the trap is not revealed — and
//! blocked for `block_for`. Runs before the upstream and before greylisting, so the block
//! happens on first touch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::reputation::Reputation;
use super::{BoxFuture, Category, Check, CheckError, Context, Refusal, Stage, Verdict};
use crate::config::duration;
use crate::smtp::codec::Reply;

/// `[checks.traps]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrapsConfig {
    /// Whole trap addresses, e.g. `"old-sales@example.com"`.
    pub addresses: Vec<String>,
    /// Local parts that are traps in every local domain, e.g. `"spamtrap"`.
    pub local_parts: Vec<String>,
    /// Files with one address (or `@`-less local part) a line, `#` comments; re-read on
    /// reload.
    pub files: Vec<std::path::PathBuf>,
    /// How long a client that touched a trap stays blocked. Default "24h".
    #[serde(with = "duration")]
    pub block_for: Duration,
}

impl Default for TrapsConfig {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            local_parts: Vec::new(),
            files: Vec::new(),
            block_for: Duration::from_secs(86400),
        }
    }
}

impl TrapsConfig {
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.local_parts.is_empty() && self.files.is_empty()
    }
}

pub struct TrapsCheck {
    addresses: HashSet<String>,
    local_parts: HashSet<String>,
    block_for: Duration,
    reputation: Arc<Reputation>,
}

impl TrapsCheck {
    /// Builds the check, reading the trap files.
    ///
    /// # Errors
    /// Unreadable files and malformed entries, with their key (and file:line).
    pub fn build(config: &TrapsConfig, reputation: Arc<Reputation>) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut addresses = HashSet::new();
        let mut local_parts = HashSet::new();
        let mut add = |entry: &str, origin: String, errors: &mut Vec<String>| {
            let e = entry.trim().to_lowercase();
            match e.split_once('@') {
                Some((l, d)) if !l.is_empty() && crate::smtp::address::is_hostname(d) => {
                    addresses.insert(e);
                }
                None if !e.is_empty() && !e.contains(char::is_whitespace) => {
                    local_parts.insert(e);
                }
                _ => errors.push(format!("{origin}: {entry:?} is not an address or a local part")),
            }
        };
        for (i, a) in config.addresses.iter().enumerate() {
            add(a, format!("checks.traps.addresses[{i}]"), &mut errors);
        }
        for (i, l) in config.local_parts.iter().enumerate() {
            if l.contains('@') {
                errors.push(format!(
                    "checks.traps.local_parts[{i}]: {l:?} has a domain; put it in addresses"
                ));
            } else {
                add(l, format!("checks.traps.local_parts[{i}]"), &mut errors);
            }
        }
        for path in &config.files {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for (n, line) in text.lines().enumerate() {
                        let line = line.split('#').next().unwrap_or("").trim();
                        if !line.is_empty() {
                            add(
                                line,
                                format!("checks.traps.files: {}:{}", path.display(), n + 1),
                                &mut errors,
                            );
                        }
                    }
                }
                Err(e) => errors.push(format!("checks.traps.files: cannot read {}: {e}", path.display())),
            }
        }
        if errors.is_empty() {
            Ok(Self {
                addresses,
                local_parts,
                block_for: config.block_for,
                reputation,
            })
        } else {
            Err(errors)
        }
    }

    /// True when the recipient is a trap.
    pub fn is_trap(&self, rcpt: &crate::smtp::address::Address) -> bool {
        let Some(domain) = rcpt.domain_lower() else {
            return false;
        };
        let local = rcpt.local.trim_matches('"').to_lowercase();
        self.addresses.contains(&format!("{local}@{domain}")) || self.local_parts.contains(&local)
    }
}

impl Check for TrapsCheck {
    fn name(&self) -> &'static str {
        "traps"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Rcpt]
    }

    fn needs_io(&self) -> bool {
        true
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(async move {
            let Some(rcpt) = cx.recipient.filter(|r| self.is_trap(r)) else {
                return Ok(Verdict::Pass);
            };
            let ip = cx.session.peer.ip();
            let reason = format!("trap:{}", rcpt.raw.to_lowercase());
            // A failed block must not let the message through: the refusal stands either way.
            if let Err(e) = self.reputation.block(ip, &reason, self.block_for).await {
                tracing::warn!(client = %ip, error = %e, "Spam trap hit, but the block could not be stored.");
            }
            Ok(Verdict::Reject(Refusal {
                reply: Reply::build(
                    550,
                    "5.1.1",
                    format!("{rcpt}: Recipient address rejected: User unknown"),
                ),
                category: Category::Trap,
            }))
        })
    }
}
