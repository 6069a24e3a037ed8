//! Failed sign-in rate limits, per client address and per identity (token buckets).
//!
//! Every failed sign-in (401) takes a token from the bucket of its address and of the identity
//! it named, and a request with no credential at all from the bucket of its address; buckets refill at one token per `refill` up to `burst`. With the address's bucket
//! empty, every request from that address is answered 429 with `Retry-After` before any work
//! (as Key Vault throttles: code `Throttled`). With an identity's bucket empty, a request for
//! that identity is still checked, and passes when its credential is right (so nobody locks a
//! legitimate holder out by guessing at its name), but a wrong one is answered 429.
//!
//! Only failures that found tokens are written to the audit log one by one; when a bucket runs
//! dry, one line says so, so that a flood of bad sign-ins grows the log by a bounded amount:
//! at most `burst` + 1 lines, then one per `refill` and bucket.
//!
//! The tables are bounded ([`MAX_ENTRIES`] each): full, they drop idle (full) buckets first,
//! then the least recently touched.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most buckets kept per table.
pub const MAX_ENTRIES: usize = 4096;

/// Failed sign-in limits.
#[derive(Clone, Copy, Debug)]
pub struct ThrottleConfig {
    /// Failures allowed in a burst (per address and per identity).
    pub burst: u32,
    /// One more failure is allowed per this interval.
    pub refill: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> ThrottleConfig {
        ThrottleConfig {
            burst: 20,
            refill: Duration::from_secs(3),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

struct Table<K> {
    map: HashMap<K, Bucket>,
}

impl<K: Eq + Hash + Clone> Table<K> {
    fn refill(&self, b: &mut Bucket, cfg: &ThrottleConfig, now: Instant) {
        let per = cfg.refill.as_secs_f64().max(1e-3);
        let gained = now.duration_since(b.updated).as_secs_f64() / per;
        b.tokens = (b.tokens + gained).min(f64::from(cfg.burst));
        b.updated = now;
    }

    /// Time until a token is back, if the bucket of `k` is empty.
    fn empty_for(&mut self, k: &K, cfg: &ThrottleConfig, now: Instant) -> Option<Duration> {
        let mut b = *self.map.get(k)?;
        self.refill(&mut b, cfg, now);
        self.map.insert(k.clone(), b);
        (b.tokens < 1.0).then(|| cfg.refill.mul_f64(1.0 - b.tokens))
    }

    /// Takes a token; returns (had one, is now empty).
    fn take(&mut self, k: &K, cfg: &ThrottleConfig, now: Instant) -> (bool, bool) {
        if !self.map.contains_key(k) && self.map.len() >= MAX_ENTRIES {
            self.evict(cfg, now);
        }
        let mut b = self.map.get(k).copied().unwrap_or(Bucket {
            tokens: f64::from(cfg.burst),
            updated: now,
        });
        self.refill(&mut b, cfg, now);
        let had = b.tokens >= 1.0;
        if had {
            b.tokens -= 1.0;
        }
        self.map.insert(k.clone(), b);
        (had, b.tokens < 1.0)
    }

    fn evict(&mut self, cfg: &ThrottleConfig, now: Instant) {
        let full = f64::from(cfg.burst);
        let per = cfg.refill.as_secs_f64().max(1e-3);
        self.map
            .retain(|_, b| b.tokens + now.duration_since(b.updated).as_secs_f64() / per < full);
        if self.map.len() >= MAX_ENTRIES {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
    }
}

/// What a failed sign-in turned into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Write this failure's audit line (it was within the limits).
    pub audit: bool,
    /// This failure emptied a bucket: write one line saying later ones are throttled.
    pub throttled_now: bool,
}

/// The two tables.
pub struct Throttle {
    cfg: ThrottleConfig,
    addrs: Mutex<Table<IpAddr>>,
    identities: Mutex<Table<String>>,
}

impl Throttle {
    /// Empty tables.
    pub fn new(cfg: ThrottleConfig) -> Throttle {
        Throttle {
            cfg,
            addrs: Mutex::new(Table {
                map: HashMap::new(),
            }),
            identities: Mutex::new(Table {
                map: HashMap::new(),
            }),
        }
    }

    /// `Some(retry after)` when `addr` has used up its failed sign-ins.
    pub fn address_blocked(&self, addr: IpAddr) -> Option<Duration> {
        let mut t = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
        t.empty_for(&addr, &self.cfg, Instant::now())
    }

    /// `Some(retry after)` when `identity` has used up its failed sign-ins.
    pub fn identity_blocked(&self, identity: &str) -> Option<Duration> {
        let mut t = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        t.empty_for(&identity.to_string(), &self.cfg, Instant::now())
    }

    /// Records a failed sign-in from `addr` naming `identity`.
    pub fn failed(&self, addr: IpAddr, identity: &str) -> Failure {
        let now = Instant::now();
        let (a_had, a_empty) = self
            .addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&addr, &self.cfg, now);
        let (i_had, i_empty) = self
            .identities
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&identity.to_string(), &self.cfg, now);
        Failure {
            audit: a_had && i_had,
            throttled_now: (a_had && a_empty) || (i_had && i_empty),
        }
    }

    /// Records a request from `addr` that carried no credential at all. The Azure SDKs send
    /// one such request to learn the challenge (once per client), so it is not a failed
    /// sign-in (no audit line, no identity), but it spends the address's allowance like one:
    /// otherwise one address could send tokenless requests without end (second review, M3).
    /// Returns whether this request emptied the address's bucket.
    pub fn tokenless(&self, addr: IpAddr) -> bool {
        let (had, empty) = self.addrs.lock().unwrap_or_else(|e| e.into_inner()).take(
            &addr,
            &self.cfg,
            Instant::now(),
        );
        had && empty
    }

    /// The retry delay to advertise once a bucket is empty.
    pub fn refill(&self) -> Duration {
        self.cfg.refill
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_blocked_then_refilled() {
        let t = Throttle::new(ThrottleConfig {
            burst: 3,
            refill: Duration::from_millis(200),
        });
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let f: Vec<Failure> = (0..3).map(|_| t.failed(a, "x")).collect();
        assert!(f.iter().all(|f| f.audit));
        assert_eq!(f.iter().filter(|f| f.throttled_now).count(), 1);
        assert!(t.address_blocked(a).is_some());
        assert!(t.identity_blocked("x").is_some());
        assert!(t.identity_blocked("y").is_none());
        let more = t.failed(a, "y");
        assert!(!more.audit && !more.throttled_now);
        std::thread::sleep(Duration::from_millis(450));
        assert!(t.address_blocked(a).is_none());
    }

    #[test]
    fn tokenless_requests_spend_the_address_allowance_only() {
        let t = Throttle::new(ThrottleConfig {
            burst: 3,
            refill: Duration::from_secs(60),
        });
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let emptied: Vec<bool> = (0..4).map(|_| t.tokenless(a)).collect();
        assert_eq!(emptied, [false, false, true, false]);
        assert!(t.address_blocked(a).is_some());
        assert!(t.address_blocked("127.0.0.3".parse().unwrap()).is_none());
        assert!(t.identity_blocked("").is_none());
    }

    #[test]
    fn tables_stay_bounded() {
        let t = Throttle::new(ThrottleConfig::default());
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        for i in 0..(MAX_ENTRIES + 100) {
            t.failed(a, &format!("id{i}"));
        }
        assert!(t.identities.lock().unwrap().map.len() <= MAX_ENTRIES);
    }
}
