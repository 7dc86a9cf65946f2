//! Idle upstream connections kept between client sessions, so a client connection does not
//! cost an upstream connect, greeting, EHLO and STARTTLS of its own (Postfix's smtp client
//! keeps a connection cache for the same reason). Only clean connections are kept: no
//! transaction open, not inside DATA, never one that carried AUTH.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::relay::{ClientIdentity, UpstreamConn};
use crate::upstream::Upstream;

/// When a kept connection must go, per upstream.
#[derive(Debug, Clone, Copy)]
struct Limits {
    idle: Duration,
    max_age: Duration,
    max_idle: usize,
}

/// What the bookkeeping needs to know of a connection (generic so the rules are tested
/// without sockets).
trait Pooled {
    /// Identity of the upstream it goes to.
    fn key(&self) -> *const Upstream;
    fn limits(&self) -> Limits;
    fn opened(&self) -> Instant;
}

#[derive(Debug)]
struct Slot<T> {
    item: T,
    since: Instant,
}

#[derive(Debug)]
struct Slots<T> {
    idle: Vec<Slot<T>>,
    closed: bool,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self {
            idle: Vec::new(),
            closed: false,
        }
    }
}

impl<T: Pooled> Slots<T> {
    fn expired(slot: &Slot<T>, now: Instant) -> bool {
        let l = slot.item.limits();
        now.saturating_duration_since(slot.since) >= l.idle
            || now.saturating_duration_since(slot.item.opened()) >= l.max_age
    }

    /// Keeps `item`, or gives it back when the pool is closed, reuse is off, it is too old
    /// or enough connections to its upstream wait already.
    fn put(&mut self, item: T, now: Instant) -> Result<(), T> {
        let l = item.limits();
        let too_old = now.saturating_duration_since(item.opened()) >= l.max_age;
        if self.closed || l.idle.is_zero() || too_old {
            return Err(item);
        }
        let key = item.key();
        if self.idle.iter().filter(|s| s.item.key() == key).count() >= l.max_idle {
            return Err(item);
        }
        self.idle.push(Slot { item, since: now });
        Ok(())
    }

    /// The most recently kept connection to `key` that has not expired and `fits`. Expired ones stay
    /// for [`Self::sweep`], which closes them politely.
    fn take(&mut self, key: *const Upstream, now: Instant, fits: impl Fn(&T) -> bool) -> Option<T> {
        let i = self
            .idle
            .iter()
            .rposition(|s| s.item.key() == key && !Self::expired(s, now) && fits(&s.item))?;
        Some(self.idle.remove(i).item)
    }

    /// Removes expired connections and those whose upstream `keep` rejects.
    fn sweep(&mut self, now: Instant, keep: impl Fn(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.idle.len() {
            if Self::expired(&self.idle[i], now) || !keep(&self.idle[i].item) {
                out.push(self.idle.remove(i).item);
            } else {
                i += 1;
            }
        }
        out
    }

    fn close(&mut self) -> Vec<T> {
        self.closed = true;
        self.idle.drain(..).map(|s| s.item).collect()
    }
}

impl Pooled for Box<UpstreamConn> {
    fn key(&self) -> *const Upstream {
        Arc::as_ptr(&self.upstream)
    }

    fn limits(&self) -> Limits {
        Limits {
            idle: self.upstream.reuse_idle,
            max_age: self.upstream.reuse_max_age,
            max_idle: self.upstream.reuse_max_idle,
        }
    }

    fn opened(&self) -> Instant {
        self.opened
    }
}

/// The idle connections of every upstream; one per process, carried across reloads.
#[derive(Debug, Default)]
pub struct Pool {
    slots: Mutex<Slots<Box<UpstreamConn>>>,
}

impl Pool {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots<Box<UpstreamConn>>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection to `up` that is still open and may carry `client`'s mail. The
    /// caller re-addresses it to its client ([`UpstreamConn::reassign`]) before use.
    pub fn take(&self, up: &Arc<Upstream>, client: &ClientIdentity) -> Option<Box<UpstreamConn>> {
        loop {
            let mut conn = self
                .slots()
                .take(Arc::as_ptr(up), Instant::now(), |c| c.can_serve(client))?;
            if conn.still_open() {
                return Some(conn);
            }
            // The MTA closed it (or said 421) while it waited: dropping it is all that is left.
        }
    }

    /// Keeps a connection a session no longer needs; gives it back when it cannot be kept
    /// (the caller then says QUIT).
    pub fn put(&self, conn: Box<UpstreamConn>) -> Result<(), Box<UpstreamConn>> {
        if !conn.reusable() {
            return Err(conn);
        }
        self.slots().put(conn, Instant::now())
    }

    /// Removes the connections that waited too long, grew too old, or go to an upstream
    /// no longer configured (after a reload), for the caller to close.
    pub fn sweep(&self, current: &[Arc<Upstream>]) -> Vec<Box<UpstreamConn>> {
        self.slots().sweep(Instant::now(), |c| {
            current.iter().any(|u| Arc::ptr_eq(u, &c.upstream))
        })
    }

    /// At shutdown: keeps nothing more and returns what it held.
    pub fn close(&self) -> Vec<Box<UpstreamConn>> {
        self.slots().close()
    }

    /// Idle connections held now (metrics).
    pub fn len(&self) -> usize {
        self.slots().idle.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Says QUIT on each connection, all at once, within a few seconds in all.
pub async fn quit_all(conns: Vec<Box<UpstreamConn>>) {
    if conns.is_empty() {
        return;
    }
    let quits = futures_util::future::join_all(conns.into_iter().map(|c| c.quit()));
    let _ = tokio::time::timeout(Duration::from_secs(3), quits).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake {
        key: usize,
        opened: Instant,
        limits: Limits,
    }

    impl Pooled for Fake {
        fn key(&self) -> *const Upstream {
            std::ptr::without_provenance(self.key)
        }
        fn limits(&self) -> Limits {
            self.limits
        }
        fn opened(&self) -> Instant {
            self.opened
        }
    }

    const LIMITS: Limits = Limits {
        idle: Duration::from_secs(2),
        max_age: Duration::from_secs(300),
        max_idle: 2,
    };

    fn fake(key: usize, opened: Instant) -> Fake {
        Fake {
            key,
            opened,
            limits: LIMITS,
        }
    }

    #[test]
    fn takes_the_most_recent_connection_of_its_upstream() {
        let t0 = Instant::now();
        let mut s = Slots::default();
        assert!(s.put(fake(1, t0), t0).is_ok());
        assert!(s.put(fake(2, t0), t0).is_ok());
        let later = t0 + Duration::from_millis(10);
        assert!(s.put(fake(1, later), later).is_ok());
        let got = s.take(std::ptr::without_provenance(1), later, |_| true).unwrap();
        assert_eq!((got.key, got.opened), (1, later));
        assert_eq!(
            s.take(std::ptr::without_provenance(1), later, |_| true)
                .unwrap()
                .opened,
            t0
        );
        assert!(s.take(std::ptr::without_provenance(1), later, |_| true).is_none());
        assert!(s.take(std::ptr::without_provenance(3), later, |_| true).is_none());
    }

    #[test]
    fn takes_only_a_connection_that_fits() {
        let t0 = Instant::now();
        let mut s = Slots::default();
        s.put(fake(1, t0), t0).unwrap();
        let later = t0 + Duration::from_millis(10);
        s.put(fake(1, later), later).unwrap();
        // The newer one does not fit (e.g. told another client): the older one is taken and
        // the newer one stays.
        let got = s
            .take(std::ptr::without_provenance(1), later, |f| f.opened == t0)
            .unwrap();
        assert_eq!(got.opened, t0);
        assert!(
            s.take(std::ptr::without_provenance(1), later, |f| f.opened == t0)
                .is_none()
        );
        assert_eq!(s.idle.len(), 1);
    }

    #[test]
    fn idle_and_age_limits() {
        let t0 = Instant::now();
        let mut s = Slots::default();
        s.put(fake(1, t0), t0).unwrap();
        // Idle for exactly the limit: gone (not taken, swept).
        let t2 = t0 + LIMITS.idle;
        assert!(s.take(std::ptr::without_provenance(1), t2, |_| true).is_none());
        assert_eq!(s.sweep(t2, |_| true).len(), 1);
        assert!(s.idle.is_empty());
        // Opened long ago: not kept at all, and not taken once it grew too old while idle.
        let old = t0;
        let now = t0 + LIMITS.max_age;
        assert!(s.put(fake(1, old), now).is_err());
        let almost = t0 + LIMITS.max_age - Duration::from_secs(1);
        s.put(fake(1, old), almost).unwrap();
        assert!(s.take(std::ptr::without_provenance(1), now, |_| true).is_none());
        assert_eq!(s.sweep(now, |_| true).len(), 1);
    }

    #[test]
    fn at_most_max_idle_per_upstream_and_off_when_idle_is_zero() {
        let t0 = Instant::now();
        let mut s = Slots::default();
        s.put(fake(1, t0), t0).unwrap();
        s.put(fake(1, t0), t0).unwrap();
        assert!(s.put(fake(1, t0), t0).is_err());
        s.put(fake(2, t0), t0).unwrap();
        let mut off = fake(3, t0);
        off.limits.idle = Duration::ZERO;
        assert!(s.put(off, t0).is_err());
    }

    #[test]
    fn sweep_drops_replaced_upstreams_and_close_empties() {
        let t0 = Instant::now();
        let mut s = Slots::default();
        s.put(fake(1, t0), t0).unwrap();
        s.put(fake(2, t0), t0).unwrap();
        let gone = s.sweep(t0, |f| f.key == 2);
        assert_eq!(gone.iter().map(|f| f.key).collect::<Vec<_>>(), [1]);
        assert_eq!(s.close().len(), 1);
        assert!(s.put(fake(2, t0), t0).is_err());
    }
}
