//! Bounds on what clients can make the server hold: time, sessions and payload memory.
//!
//! - A handshake (TLS included) must finish within [`Limits::handshake_timeout`]; a client
//!   that dribbles bytes or never sends an option is closed then.
//! - [`Admission`] caps sessions in total and per client IP address; a connection past a cap
//!   is closed at once, before the server sends anything.
//! - [`Limits::memory_budget`] bounds the write payloads and read replies held by all
//!   connections together, on top of each connection's [`crate::proto::MAX_IN_FLIGHT_BYTES`].
//! - In transmission, every request holds one of its connection's
//!   [`crate::proto::MAX_IN_FLIGHT`] slots until its reply is written, and a client that takes
//!   no byte of its replies for [`Limits::reply_timeout`] is disconnected; with
//!   [`Limits::idle_timeout`], a connection with nothing in flight that sends no request for
//!   that long is closed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Resource limits of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub handshake_timeout: Duration,
    /// `None`: idle connections are kept (hypervisors keep a disk's connection open while
    /// the guest does no I/O, and qemu does not reconnect by default).
    pub idle_timeout: Option<Duration>,
    pub reply_timeout: Duration,
    pub max_sessions: usize,
    pub max_sessions_per_client: usize,
    /// Payload bytes (write payloads, read replies) held by all connections together.
    pub memory_budget: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: None,
            reply_timeout: Duration::from_secs(60),
            max_sessions: 1024,
            max_sessions_per_client: 256,
            memory_budget: 1 << 30,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManySessions,
    TooManyFromClient,
}

/// Counts open sessions, in total and per client address.
#[derive(Debug, Default)]
pub struct Admission {
    state: Mutex<Counts>,
    max_total: usize,
    max_per_client: usize,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// An admitted session's place; given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    client: Option<IpAddr>,
}

impl Admission {
    pub fn new(max_total: usize, max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            max_total,
            max_per_client,
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a session from `client` (`None`: a Unix socket, counted in the total only).
    pub fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Result<Ticket, Refusal> {
        let mut c = self.counts();
        if c.total >= self.max_total {
            return Err(Refusal::TooManySessions);
        }
        if let Some(ip) = client {
            let n = c.per_client.entry(ip).or_insert(0);
            if *n >= self.max_per_client {
                return Err(Refusal::TooManyFromClient);
            }
            *n += 1;
        }
        c.total += 1;
        Ok(Ticket {
            admission: Arc::clone(self),
            client,
        })
    }

    /// Open sessions in total.
    pub fn open_sessions(&self) -> usize {
        self.counts().total
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.total -= 1;
        if let Some(ip) = self.client {
            if let Some(n) = c.per_client.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.per_client.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_total_and_per_client() {
        let a = Admission::new(3, 2);
        let ip1: IpAddr = "127.0.0.2".parse().unwrap();
        let ip2: IpAddr = "127.0.0.3".parse().unwrap();
        let t1 = a.admit(Some(ip1)).unwrap();
        let t2 = a.admit(Some(ip1)).unwrap();
        assert_eq!(a.admit(Some(ip1)).unwrap_err(), Refusal::TooManyFromClient);
        let t3 = a.admit(Some(ip2)).unwrap();
        assert_eq!(a.admit(None).unwrap_err(), Refusal::TooManySessions);
        drop(t1);
        assert_eq!(a.open_sessions(), 2);
        let t4 = a.admit(Some(ip1)).unwrap();
        drop((t2, t3, t4));
        assert_eq!(a.open_sessions(), 0);
        assert!(a.counts().per_client.is_empty());
    }
}
