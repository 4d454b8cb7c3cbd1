//! Who holds the server's connection slots, so that no client can lock the others out with
//! idle or half-sent connections (slowloris).
//!
//! Every accepted connection is an [`Entry`] with its peer address and whether it has a
//! request in flight. A connection with no request in flight (it has not finished sending a
//! request's header, or is an idle keep-alive) is *idle* and may be evicted:
//! - **per address**: an address at [`ConnLimits::max_per_ip`] loses its own oldest idle
//!   connection to its newcomer (refused only when all of its connections are busy);
//! - **when full**: at [`ConnLimits::max_total`] the newcomer takes the slot of the oldest idle
//!   connection of the address holding the most connections (refused only when every
//!   connection is busy);
//! - **by age**: a connection idle longer than the idle deadline is closed by [`sweep`]; the
//!   deadline is [`ConnLimits::idle_timeout`] while the table is at most half full and shrinks
//!   linearly to [`ConnLimits::min_idle_timeout`] as it fills.
//!
//! An evicted connection is told through its [`Ticket`]'s `kicked` and closes at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The caps of the table (from `[limits]`).
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Connections open at once (`limits.max_connections`, within the open-files limit).
    pub max_total: usize,
    /// Connections open at once from one peer address (`limits.max_connections_per_ip`).
    pub max_per_ip: usize,
    /// How long a connection may stay idle (no request in flight) while the table is at most
    /// half full.
    pub idle_timeout: Duration,
    /// The idle deadline when the table is full.
    pub min_idle_timeout: Duration,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every one of the server's `max_total` connections has a request in flight.
    Full(usize),
    /// Every one of this address's `max_per_ip` connections has a request in flight.
    PerIp(usize),
}

struct Entry {
    ip: IpAddr,
    /// Requests in flight (a response body still being sent counts).
    busy: u32,
    /// When the connection was accepted or its last request ended.
    idle_since: Instant,
    kick: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<u64, Entry>,
    per_ip: HashMap<IpAddr, usize>,
    next: u64,
    evicted: u64,
    refused: u64,
    /// Evictions and refusals not yet logged (one summary line per sweep at most).
    unreported: (u64, u64),
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if let Some(n) = self.per_ip.get_mut(&e.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&e.ip);
            }
        }
        Some(e)
    }

    fn evict(&mut self, id: u64) {
        if let Some(e) = self.remove(id) {
            e.kick.notify_one();
            self.evicted += 1;
            self.unreported.0 += 1;
        }
    }

    /// The oldest idle connection among those `pick` accepts, preferring (first) the address
    /// with the most connections.
    fn victim(&self, pick: impl Fn(&Entry) -> bool) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, e)| e.busy == 0 && pick(e))
            .max_by_key(|(_, e)| {
                (
                    self.per_ip.get(&e.ip).copied().unwrap_or(0),
                    std::cmp::Reverse(e.idle_since),
                )
            })
            .map(|(id, _)| *id)
    }
}

/// The server's connections (see the module documentation).
pub struct ConnTable {
    limits: ConnLimits,
    inner: Mutex<Inner>,
}

/// Open connections, and what the table did since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnStats {
    pub open: usize,
    pub idle: usize,
    pub addresses: usize,
    pub evicted: u64,
    pub refused: u64,
}

impl ConnTable {
    pub fn new(limits: ConnLimits) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent maps (every update is one step).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `ip`, evicting an idle one if a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let mut t = self.lock();
        if t.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_ip {
            match t.victim(|e| e.ip == ip) {
                Some(id) => t.evict(id),
                None => {
                    t.refused += 1;
                    t.unreported.1 += 1;
                    return Err(Refusal::PerIp(self.limits.max_per_ip));
                }
            }
        }
        if t.conns.len() >= self.limits.max_total {
            match t.victim(|_| true) {
                Some(id) => t.evict(id),
                None => {
                    t.refused += 1;
                    t.unreported.1 += 1;
                    return Err(Refusal::Full(self.limits.max_total));
                }
            }
        }
        let id = t.next;
        t.next += 1;
        let kick = Arc::new(Notify::new());
        t.conns.insert(
            id,
            Entry {
                ip,
                busy: 0,
                idle_since: Instant::now(),
                kick: kick.clone(),
            },
        );
        *t.per_ip.entry(ip).or_insert(0) += 1;
        Ok(Ticket {
            id,
            table: self.clone(),
            kicked: kick,
        })
    }

    /// The idle deadline for the table's current occupancy.
    pub fn idle_deadline(&self, open: usize) -> Duration {
        let l = self.limits;
        let fill = open as f64 / l.max_total.max(1) as f64;
        if fill <= 0.5 {
            return l.idle_timeout;
        }
        let span = l.idle_timeout.saturating_sub(l.min_idle_timeout);
        l.idle_timeout
            .saturating_sub(span.mul_f64(((fill - 0.5) * 2.0).min(1.0)))
            .max(l.min_idle_timeout)
    }

    /// Closes the connections idle past the current deadline; returns how many.
    pub fn sweep(&self) -> usize {
        let mut t = self.lock();
        let deadline = self.idle_deadline(t.conns.len());
        let now = Instant::now();
        let old: Vec<u64> = t
            .conns
            .iter()
            .filter(|(_, e)| e.busy == 0 && now.duration_since(e.idle_since) > deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            t.evict(*id);
        }
        old.len()
    }

    /// Closes every idle connection (shutdown: nothing more will be served on them).
    pub fn close_idle(&self) -> usize {
        let mut t = self.lock();
        let idle: Vec<u64> = t
            .conns
            .iter()
            .filter(|(_, e)| e.busy == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in &idle {
            t.evict(*id);
        }
        idle.len()
    }

    pub fn stats(&self) -> ConnStats {
        let t = self.lock();
        ConnStats {
            open: t.conns.len(),
            idle: t.conns.values().filter(|e| e.busy == 0).count(),
            addresses: t.per_ip.len(),
            evicted: t.evicted,
            refused: t.refused,
        }
    }

    /// Evictions and refusals since the last call (for one log line per period).
    pub fn take_unreported(&self) -> (u64, u64) {
        std::mem::take(&mut self.lock().unreported)
    }
}

/// A connection's place in the table; dropping it frees the slot.
pub struct Ticket {
    id: u64,
    table: Arc<ConnTable>,
    /// Fires when the table evicts this connection.
    pub kicked: Arc<Notify>,
}

impl Ticket {
    /// Marks a request in flight until the guard is dropped (with the response body).
    pub fn busy(&self) -> Busy {
        if let Some(e) = self.table.lock().conns.get_mut(&self.id) {
            e.busy += 1;
        }
        Busy {
            id: self.id,
            table: self.table.clone(),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.table.lock().remove(self.id);
    }
}

/// A request in flight on a connection (see [`Ticket::busy`]).
pub struct Busy {
    id: u64,
    table: Arc<ConnTable>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(e) = self.table.lock().conns.get_mut(&self.id) {
            e.busy = e.busy.saturating_sub(1);
            if e.busy == 0 {
                e.idle_since = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(total: usize, per_ip: usize) -> Arc<ConnTable> {
        ConnTable::new(ConnLimits {
            max_total: total,
            max_per_ip: per_ip,
            idle_timeout: Duration::from_secs(30),
            min_idle_timeout: Duration::from_secs(2),
        })
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn an_address_at_its_cap_loses_its_own_oldest_idle_connection() {
        let t = table(100, 3);
        let a: Vec<Ticket> = (0..3).map(|_| t.admit(ip(1)).expect("admit")).collect();
        let _b = t.admit(ip(2)).expect("other address");
        let _busy = a[0].busy();
        let _new = t.admit(ip(1)).expect("evicts an idle one");
        // a[0] is busy, so a[1] (the oldest idle) went.
        assert_eq!(t.stats().open, 4);
        assert_eq!(t.stats().evicted, 1);
        assert!(t.lock().conns.contains_key(&a[0].id));
        assert!(!t.lock().conns.contains_key(&a[1].id));
    }

    #[test]
    fn a_full_table_evicts_from_the_largest_address_and_refuses_only_when_all_are_busy() {
        let t = table(4, 10);
        let hog: Vec<Ticket> = (0..3).map(|_| t.admit(ip(1)).expect("admit")).collect();
        let other = t.admit(ip(2)).expect("admit");
        let newcomer = t.admit(ip(3)).expect("evicts one of the hog's");
        assert!(!t.lock().conns.contains_key(&hog[0].id));
        assert!(t.lock().conns.contains_key(&other.id));
        let guards: Vec<Busy> = std::iter::once(&other)
            .chain(hog.iter().skip(1))
            .chain(std::iter::once(&newcomer))
            .map(|x| x.busy())
            .collect();
        assert_eq!(t.admit(ip(4)).err(), Some(Refusal::Full(4)));
        drop(guards);
        assert!(t.admit(ip(4)).is_ok());
    }

    #[test]
    fn the_idle_deadline_shrinks_as_the_table_fills() {
        let t = table(100, 100);
        assert_eq!(t.idle_deadline(10), Duration::from_secs(30));
        assert_eq!(t.idle_deadline(50), Duration::from_secs(30));
        assert_eq!(t.idle_deadline(75), Duration::from_secs(16));
        assert_eq!(t.idle_deadline(100), Duration::from_secs(2));
        assert_eq!(t.idle_deadline(1000), Duration::from_secs(2));
    }

    #[test]
    fn dropping_tickets_frees_every_count() {
        let t = table(10, 10);
        let x = t.admit(ip(1)).expect("admit");
        let g = x.busy();
        drop(x);
        drop(g);
        assert_eq!(t.stats(), ConnStats::default());
    }
}
