//! What the server counts, in the Prometheus text format (`--metrics-listen`, see [`crate::health`]).
//!
//! Every label has a small, fixed set of values: a method name, `ok` or a `capsync/...`
//! marker, an op status, a revocation kind, a refusal reason. Never a token, a session or share
//! id, a title or a peer address, so the number of series stays bounded whatever clients do.

use capsync_persistence::writer::GroupReport;
use capsync_persistence::{BatchAck, OpStatus};
use capsync_schema::marker;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Why the server refused or closed a connection, or held back its reads (a limit at work).
#[derive(Clone, Copy, Debug)]
pub enum Refusal {
    PerAddress,
    AnonymousShare,
    FrameTimeout,
    Idle,
    ByteBudget,
    /// A frame over the message size limit (or with a malformed segment table).
    FrameTooLarge,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::PerAddress => "per-address-limit",
            Refusal::AnonymousShare => "anonymous-share",
            Refusal::FrameTimeout => "frame-timeout",
            Refusal::Idle => "idle-timeout",
            Refusal::ByteBudget => "byte-budget",
            Refusal::FrameTooLarge => "frame-too-large",
        }
    }
}

/// The server's metrics and the registry that encodes them. Cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Gauge,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<CallLabels, Histogram>,
    ops: Family<StatusLabels, Counter>,
    commit_seconds: Histogram,
    ops_per_commit: Histogram,
    writer_queue: Gauge,
    subscriptions: Gauge,
    delivery_lag: Histogram,
    redeems: Family<OutcomeLabels, Counter>,
    revocations: Family<KindLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    store_errors: Counter,
    epoch_cells: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("capsync");
        let connections = Gauge::default();
        registry.register("connections", "Open client connections", connections.clone());
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("calls", "RPC calls by method and outcome (ok or the capsync/... marker)", calls.clone());
        let call_seconds =
            Family::<CallLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_25, 2.0, 16)));
        registry.register("call_seconds", "RPC call latency by method and outcome (append: the batch's ack latency)", call_seconds.clone());
        let ops = Family::<StatusLabels, Counter>::default();
        registry.register("ops", "Ops answered, by status (applied, duplicate, conflict, rejected)", ops.clone());
        let commit_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        registry.register("commit_seconds", "Time to run and commit one write group (one fsync)", commit_seconds.clone());
        let ops_per_commit = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        registry.register("ops_per_commit", "Ops written by one group commit", ops_per_commit.clone());
        let writer_queue = Gauge::default();
        registry.register("writer_queue_depth", "Writes waiting for the writer when it took its last group", writer_queue.clone());
        let subscriptions = Gauge::default();
        registry.register("subscriptions", "Live subscriptions", subscriptions.clone());
        let delivery_lag = Histogram::new(exponential_buckets(1.0, 4.0, 12));
        registry.register("subscription_lag_ops", "Ops a subscription was behind its session's cursor at each delivery", delivery_lag.clone());
        let redeems = Family::<OutcomeLabels, Counter>::default();
        registry.register("redeems", "Token redeems by outcome (ok or the capsync/... marker)", redeems.clone());
        let revocations = Family::<KindLabels, Counter>::default();
        registry.register("revocations", "Revocations committed, by kind (share, session)", revocations.clone());
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register("limit_refusals", "Connections refused or closed, and reads held back, by the limit that acted", refusals.clone());
        let store_errors = Counter::default();
        registry.register("store_errors", "Calls that failed in the store (I/O, full disk, stopped)", store_errors.clone());
        let epoch_cells = Gauge::default();
        registry.register("epoch_cells", "Epoch cells in memory: objects of live capabilities and of recent revocations", epoch_cells.clone());
        Metrics {
            registry,
            connections,
            calls,
            call_seconds,
            ops,
            commit_seconds,
            ops_per_commit,
            writer_queue,
            subscriptions,
            delivery_lag,
            redeems,
            revocations,
            refusals,
            store_errors,
            epoch_cells,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// A finished call: `error` is the error it answered with, if any.
    pub fn call(&self, method: &'static str, error: Option<&capnp::Error>, took: Duration) {
        let outcome = outcome_of(error);
        if outcome == marker::Marker::Internal.as_str() {
            self.store_errors.inc();
        }
        let labels = CallLabels { method, outcome };
        self.calls.get_or_create(&labels).inc();
        self.call_seconds.get_or_create(&labels).observe(took.as_secs_f64());
        if method == "redeem" {
            self.redeems.get_or_create(&OutcomeLabels { outcome }).inc();
        }
    }

    pub fn ack(&self, ack: &BatchAck) {
        for result in &ack.results {
            let status = match result.status {
                OpStatus::Applied => "applied",
                OpStatus::Duplicate => "duplicate",
                OpStatus::Conflict => "conflict",
                OpStatus::Rejected => "rejected",
            };
            self.ops.get_or_create(&StatusLabels { status }).inc();
        }
    }

    /// Called by the writer thread after each group.
    pub fn group(&self, report: &GroupReport) {
        self.commit_seconds.observe(report.took.as_secs_f64());
        self.ops_per_commit.observe(report.weight as f64);
        self.writer_queue.set(report.queued as i64);
    }

    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    pub fn connection_closed(&self) {
        self.connections.dec();
    }

    pub fn subscription_started(&self) {
        self.subscriptions.inc();
    }

    pub fn subscription_ended(&self) {
        self.subscriptions.dec();
    }

    pub fn delivered(&self, behind: u64) {
        self.delivery_lag.observe(behind as f64);
    }

    pub fn revoked(&self, kind: &'static str) {
        self.revocations.get_or_create(&KindLabels { kind }).inc();
    }

    /// Set by the epoch registry whenever its map grows or is swept.
    pub fn epoch_cells(&self, count: usize) {
        self.epoch_cells.set(count as i64);
    }

    pub fn refused(&self, why: Refusal) {
        self.refusals.get_or_create(&ReasonLabels { reason: why.name() }).inc();
    }
}

/// `ok`, or the error's marker (always one of the fixed `capsync/...` set).
fn outcome_of(error: Option<&capnp::Error>) -> &'static str {
    match error {
        None => "ok",
        Some(err) => match marker::of_error(err) {
            Some(m) => m.as_str(),
            None if err.kind == capnp::ErrorKind::Disconnected => "disconnected",
            None => "other",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_and_labels_only_fixed_values() {
        let metrics = Metrics::new();
        metrics.call("append", None, Duration::from_millis(3));
        metrics.call("redeem", Some(&capnp::Error::failed("capsync/unknown-token: no such token".into())), Duration::from_millis(1));
        metrics.refused(Refusal::Idle);
        let text = metrics.encode();
        assert!(text.contains("capsync_calls_total{method=\"append\",outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("capsync_redeems_total{outcome=\"capsync/unknown-token\"} 1"), "{text}");
        assert!(text.contains("capsync_limit_refusals_total{reason=\"idle-timeout\"} 1"), "{text}");
        for name in ["capsync_connections", "capsync_commit_seconds", "capsync_ops_per_commit", "capsync_writer_queue_depth", "capsync_subscription_lag_ops", "capsync_store_errors_total", "capsync_epoch_cells"] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
