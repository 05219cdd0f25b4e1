//! Admission of new client connections: a token bucket per source address,
//! so one address cannot make a node upgrade (and hold a task and 16 KiB of
//! buffers for) connections faster than `limits.connections_per_sec_per_source`.
//!
//! The source is the TCP peer, unless that peer is a trusted proxy
//! (`server.trusted_proxies`, addresses or CIDR prefixes): then it is the
//! rightmost address of `X-Forwarded-For` that is not itself a trusted proxy
//! (the usual rule: every hop appends the address it saw, so only the entries
//! the trusted hops added can be believed). A header from an untrusted peer is
//! ignored.
//!
//! Bounded: the table holds at most [`MAX_SOURCES`] addresses; when it is
//! full, buckets that have refilled (sources that went quiet) are dropped
//! first, and if that frees nothing the table starts again empty, which only
//! ever admits more, never less.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use ipnet::IpNet;

/// Most source addresses tracked at once.
pub const MAX_SOURCES: usize = 65_536;

/// Settings of [`Admission`] (reloadable: see [`Admission::set_rate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// New connections per second per source, sustained; 0 = no limit.
    pub per_sec: f64,
    /// Burst of new connections per source.
    pub burst: f64,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            per_sec: 1000.0,
            burst: 2000.0,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// See the module docs.
#[derive(Debug)]
pub struct Admission {
    cfg: Mutex<AdmissionConfig>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Admission {
    /// Admission with these settings.
    pub fn new(cfg: AdmissionConfig) -> Self {
        Admission {
            cfg: Mutex::new(cfg),
            buckets: Mutex::default(),
        }
    }

    /// Replaces the rate and burst (SIGHUP); the trusted proxies stay.
    pub fn set_rate(&self, per_sec: f64, burst: f64) {
        let mut c = lock(&self.cfg);
        c.per_sec = per_sec;
        c.burst = burst;
    }

    /// The source of a connection from `peer` with this `X-Forwarded-For`.
    pub fn source(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let cfg = lock(&self.cfg);
        let trusted = |a: &IpAddr| cfg.trusted_proxies.iter().any(|n| n.contains(a));
        if !trusted(&peer) {
            return peer;
        }
        let Some(header) = forwarded_for else {
            return peer;
        };
        let mut source = peer;
        for hop in header.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(a) if trusted(&a) => source = a,
                Ok(a) => return a,
                // Garbage where an address should be: believe nothing further left.
                Err(_) => return source,
            }
        }
        source
    }

    /// Whether a new connection from `source` is admitted now (takes a token).
    pub fn admit(&self, source: IpAddr) -> bool {
        self.admit_at(source, Instant::now())
    }

    fn admit_at(&self, source: IpAddr, now: Instant) -> bool {
        let (rate, burst) = {
            let c = lock(&self.cfg);
            (c.per_sec, c.burst.max(1.0))
        };
        if rate <= 0.0 {
            return true;
        }
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&source) {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
            if buckets.len() >= MAX_SOURCES {
                buckets.clear();
            }
        }
        let b = buckets.entry(source).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.tokens =
            (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Source addresses tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        lock(&self.buckets).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn adm(per_sec: f64, burst: f64, trusted: &[&str]) -> Admission {
        Admission::new(AdmissionConfig {
            per_sec,
            burst,
            trusted_proxies: trusted.iter().map(|t| t.parse().unwrap()).collect(),
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let a = adm(2.0, 3.0, &[]);
        let t0 = Instant::now();
        let src = ip("192.0.2.1");
        assert!((0..3).all(|_| a.admit_at(src, t0)));
        assert!(!a.admit_at(src, t0), "burst spent");
        assert!(
            a.admit_at(ip("192.0.2.2"), t0),
            "another source has its own"
        );
        assert!(
            a.admit_at(src, t0 + Duration::from_millis(500)),
            "2/s refills one in 0.5 s"
        );
        assert!(!a.admit_at(src, t0 + Duration::from_millis(500)));
        assert!(adm(0.0, 1.0, &[]).admit_at(src, t0), "0 = no limit");
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let a = adm(1.0, 1.0, &["10.0.0.0/8", "127.0.0.1/32"]);
        let xff = Some("198.51.100.7, 10.1.2.3");
        assert_eq!(a.source(ip("127.0.0.1"), xff), ip("198.51.100.7"));
        assert_eq!(
            a.source(ip("192.0.2.9"), xff),
            ip("192.0.2.9"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            a.source(ip("127.0.0.1"), Some("203.0.113.5, 198.51.100.7")),
            ip("198.51.100.7"),
            "the rightmost untrusted hop, not what the client claims leftmost"
        );
        assert_eq!(a.source(ip("127.0.0.1"), Some("junk")), ip("127.0.0.1"));
        assert_eq!(a.source(ip("127.0.0.1"), None), ip("127.0.0.1"));
    }

    #[test]
    fn the_table_stays_bounded() {
        let a = adm(1.0, 1.0, &[]);
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 10) {
            a.admit_at(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(a.tracked() <= MAX_SOURCES, "{}", a.tracked());
    }
}
