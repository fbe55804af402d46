//! NBD data-path metrics per disk (export) and command, fed by the NBD server's observer hook
//! ([`nbd_server::observe`]): requests, failed requests, payload bytes and latency (from the
//! request header read to the reply written).
//!
//! The per-export handles are resolved once per NBD session, so a request costs a few atomic
//! increments and one histogram observation.

use std::sync::Arc;
use std::time::Duration;

use nbd_server::observe::{Command, ExportObserver, Observer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DiskCommand {
    pub disk: String,
    pub command: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~13 s.
    Histogram::new(exponential_buckets(0.00005, 4.0, 10))
}

/// The NBD families.
#[derive(Clone)]
pub struct NbdMetrics {
    requests: Family<DiskCommand, Counter>,
    errors: Family<DiskCommand, Counter>,
    bytes: Family<DiskCommand, Counter>,
    latency: Family<DiskCommand, Histogram, fn() -> Histogram>,
}

impl NbdMetrics {
    pub fn new(r: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            errors: Family::default(),
            bytes: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        };
        r.register(
            "standby_nbd_requests",
            "NBD requests answered, by disk and command",
            m.requests.clone(),
        );
        r.register(
            "standby_nbd_request_errors",
            "NBD requests answered with an error (refused or failed), by disk and command",
            m.errors.clone(),
        );
        r.register_with_unit(
            "standby_nbd_payload",
            "Payload bytes of NBD reads and writes, by disk and command",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register_with_unit(
            "standby_nbd_request_duration",
            "Time from an NBD request's header to its reply on the socket",
            Unit::Seconds,
            m.latency.clone(),
        );
        m
    }
}

struct PerCommand {
    requests: Counter,
    errors: Counter,
    bytes: Counter,
    latency: Histogram,
}

struct ExportStats {
    by_command: Vec<(Command, PerCommand)>,
}

impl ExportObserver for ExportStats {
    fn request_done(&self, command: Command, payload_bytes: u64, elapsed: Duration, ok: bool) {
        let Some((_, m)) = self.by_command.iter().find(|(c, _)| *c == command) else {
            return;
        };
        m.requests.inc();
        if !ok {
            m.errors.inc();
        }
        if payload_bytes > 0 {
            m.bytes.inc_by(payload_bytes);
        }
        m.latency.observe(elapsed.as_secs_f64());
    }
}

impl Observer for NbdMetrics {
    fn export(&self, name: &str) -> Arc<dyn ExportObserver> {
        let by_command = Command::ALL
            .iter()
            .map(|&c| {
                let l = DiskCommand {
                    disk: name.to_string(),
                    command: c.as_str().to_string(),
                };
                (
                    c,
                    PerCommand {
                        requests: self.requests.get_or_create(&l).clone(),
                        errors: self.errors.get_or_create(&l).clone(),
                        bytes: self.bytes.get_or_create(&l).clone(),
                        latency: self.latency.get_or_create(&l).clone(),
                    },
                )
            })
            .collect();
        Arc::new(ExportStats { by_command })
    }
}
