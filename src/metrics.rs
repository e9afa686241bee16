//! Metrics: counters the request path bumps with single relaxed atomic adds, and
//! the Prometheus rendering that reads them at scrape time.
//!
//! Counters live in the state that outlives reloads (server, backend and
//! frontend stats, keyed by name), so they never reset on a reload and the hot
//! path never looks up a label or takes a lock. Every series the config
//! determines is rendered from the current snapshot, so it exists from the
//! first scrape, at 0 where nothing happened yet.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

use crate::runtime::Runtime;
use crate::supervisor::ReloadStats;
use crate::upstream::ServerStatus;
use crate::workers::ServingThreads;

/// Upper bounds in seconds: from 1 ms REST calls to 5-minute long-polls.
pub const BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// A histogram of durations, lock-free.
#[derive(Debug, Default)]
pub struct AtomicHistogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    fn to_proto(&self) -> Histogram {
        let mut cumulative = 0;
        let buckets = BUCKETS
            .iter()
            .zip(&self.counts)
            .map(|(&bound, count)| {
                cumulative += count.load(Ordering::Relaxed);
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(bound);
                bucket.set_cumulative_count(cumulative);
                bucket
            })
            .collect();
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let mut histogram = Histogram::default();
        histogram.set_bucket(buckets);
        histogram.set_sample_count(cumulative);
        histogram.set_sample_sum(self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        histogram
    }
}

/// Bytes one connection moved in one direction, added to a shared counter in
/// steps of at least [`BatchedCount::STEP`] and the rest at [`flush`]: the
/// shared cache line is written once per step rather than on every read or
/// write, and a long-lived connection (a gRPC stream, a tcp session) shows in
/// the counters while it lives, not only when it ends.
///
/// [`flush`]: BatchedCount::flush
#[derive(Debug, Default)]
pub struct BatchedCount {
    total: u64,
    pending: u64,
}

impl BatchedCount {
    pub const STEP: u64 = 16 * 1024;

    #[inline]
    pub fn add(&mut self, bytes: u64, shared: &AtomicU64) {
        self.total += bytes;
        self.pending += bytes;
        if self.pending >= Self::STEP {
            self.flush(shared);
        }
    }

    /// Adds what the shared counter does not have yet.
    pub fn flush(&mut self, shared: &AtomicU64) {
        if self.pending > 0 {
            shared.fetch_add(std::mem::take(&mut self.pending), Ordering::Relaxed);
        }
    }

    /// Everything counted, flushed or not.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The bytes one client connection or tcp session moved, from the client's
/// point of view, on their way into its frontend's counters.
#[derive(Debug, Default)]
pub struct ClientBytes {
    received: BatchedCount,
    sent: BatchedCount,
}

impl ClientBytes {
    #[inline]
    pub fn received(&mut self, bytes: u64, stats: &FrontendStats) {
        self.received.add(bytes, &stats.bytes_in);
    }

    #[inline]
    pub fn sent(&mut self, bytes: u64, stats: &FrontendStats) {
        self.sent.add(bytes, &stats.bytes_out);
    }

    /// Adds what the counters do not have yet (when the connection ends).
    pub fn flush(&mut self, stats: &FrontendStats) {
        self.received.flush(&stats.bytes_in);
        self.sent.flush(&stats.bytes_out);
    }

    /// Everything received and sent, flushed or not.
    pub fn totals(&self) -> (u64, u64) {
        (self.received.total(), self.sent.total())
    }
}

/// A frontend's counters, kept across reloads.
#[derive(Debug, Default)]
pub struct FrontendStats {
    pub connections: AtomicU64,
    pub active_connections: AtomicI64,
    pub requests: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
}

impl FrontendStats {
    /// Counts an accepted connection as open until the guard drops.
    pub fn open_connection(self: &std::sync::Arc<Self>) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.active_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            stats: std::sync::Arc::clone(self),
        }
    }
}

/// One open client connection of a frontend.
#[derive(Debug)]
pub struct OpenConnection {
    stats: std::sync::Arc<FrontendStats>,
}

impl OpenConnection {
    pub fn stats(&self) -> &std::sync::Arc<FrontendStats> {
        &self.stats
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.stats
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The status code class label: "1xx" to "5xx".
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into [`CODE_CLASSES`] for a status code.
#[inline]
pub fn code_class(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// One metric family being assembled.
struct Family {
    family: MetricFamily,
    metrics: Vec<Metric>,
}

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut family = MetricFamily::default();
        family.set_name(name.to_string());
        family.set_help(help.to_string());
        family.set_field_type(kind);
        Family {
            family,
            metrics: Vec::new(),
        }
    }

    fn counter(&mut self, labels: &[(&str, &str)], value: f64) {
        let mut counter = Counter::default();
        counter.set_value(value);
        let mut metric = metric(labels);
        metric.set_counter(counter);
        self.metrics.push(metric);
    }

    fn gauge(&mut self, labels: &[(&str, &str)], value: f64) {
        let mut gauge = Gauge::default();
        gauge.set_value(value);
        let mut metric = metric(labels);
        metric.set_gauge(gauge);
        self.metrics.push(metric);
    }

    fn histogram(&mut self, labels: &[(&str, &str)], histogram: &AtomicHistogram) {
        let mut metric = metric(labels);
        metric.set_histogram(histogram.to_proto());
        self.metrics.push(metric);
    }

    fn finish(mut self) -> MetricFamily {
        self.family.set_metric(self.metrics);
        self.family
    }
}

fn metric(labels: &[(&str, &str)]) -> Metric {
    Metric::from_label(
        labels
            .iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name((*name).to_string());
                pair.set_value((*value).to_string());
                pair
            })
            .collect(),
    )
}

/// Everything flowgate exports, in Prometheus text format.
pub fn render(runtime: &Runtime, reloads: &ReloadStats, threads: &ServingThreads) -> String {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};

    let mut up = Family::new(
        "flowgate_server_up",
        "1 when the server passes its checks.",
        GAUGE,
    );
    let mut state = Family::new(
        "flowgate_server_state",
        "1 for the server's current state.",
        GAUGE,
    );
    let mut in_flight = Family::new(
        "flowgate_server_in_flight",
        "Requests or sessions in flight on the server.",
        GAUGE,
    );
    let mut weight = Family::new(
        "flowgate_server_weight",
        "The server's weight now (slow start included).",
        GAUGE,
    );
    let mut check_failures = Family::new(
        "flowgate_server_check_failures_total",
        "Failed active health checks.",
        COUNTER,
    );
    let mut check_seconds = Family::new(
        "flowgate_server_check_duration_seconds",
        "Duration of active health checks.",
        HISTOGRAM,
    );
    let mut transitions = Family::new(
        "flowgate_server_transitions_total",
        "Times the server went up or down.",
        COUNTER,
    );
    let mut responses = Family::new(
        "flowgate_backend_responses_total",
        "Responses from servers by status class (health checks not counted).",
        COUNTER,
    );
    let mut connect_errors = Family::new(
        "flowgate_backend_connect_errors_total",
        "Failed connections to the backend's servers.",
        COUNTER,
    );
    let mut response_seconds = Family::new(
        "flowgate_backend_response_seconds",
        "Time from sending a request to the server to its response head.",
        HISTOGRAM,
    );
    let mut queue_length = Family::new(
        "flowgate_backend_queue_length",
        "Requests waiting for a server slot.",
        GAUGE,
    );
    let mut queue_seconds = Family::new(
        "flowgate_backend_queue_seconds",
        "Time requests spent waiting for a server slot.",
        HISTOGRAM,
    );
    let mut retries = Family::new(
        "flowgate_backend_retries_total",
        "Attempts made again after a failure.",
        COUNTER,
    );

    for backend in runtime.backends() {
        let b = &*backend.name;
        for server in &backend.servers {
            let s = &*server.name;
            let labels = [("backend", b), ("server", s)];
            let status = server.state.status();
            up.gauge(&labels, f64::from(u8::from(status == ServerStatus::Up)));
            for candidate in ServerStatus::ALL {
                let value = f64::from(u8::from(candidate == status));
                state.gauge(
                    &[("backend", b), ("server", s), ("state", candidate.as_str())],
                    value,
                );
            }
            in_flight.gauge(&labels, f64::from(server.state.in_flight()));
            weight.gauge(&labels, f64::from(server.weight()));
            check_failures.counter(&labels, server.state.check_failures() as f64);
            check_seconds.histogram(&labels, server.state.check_seconds());
            transitions.counter(&labels, server.state.transitions() as f64);
            for (class, code) in CODE_CLASSES.iter().enumerate() {
                let value = server.state.responses(class) as f64;
                responses.counter(&[("backend", b), ("server", s), ("code", code)], value);
            }
        }
        let labels = [("backend", b)];
        connect_errors.counter(
            &labels,
            backend.stats.connect_errors.load(Ordering::Relaxed) as f64,
        );
        response_seconds.histogram(&labels, &backend.stats.response_seconds);
        queue_length.gauge(&labels, backend.queue.len() as f64);
        queue_seconds.histogram(&labels, &backend.stats.queue_seconds);
        retries.counter(
            &labels,
            backend.stats.retries.load(Ordering::Relaxed) as f64,
        );
    }

    let mut connections = Family::new(
        "flowgate_frontend_connections_total",
        "Client connections accepted.",
        COUNTER,
    );
    let mut active = Family::new(
        "flowgate_frontend_active_connections",
        "Client connections open now.",
        GAUGE,
    );
    let mut requests = Family::new(
        "flowgate_frontend_requests_total",
        "Requests received (http mode).",
        COUNTER,
    );
    let mut bytes_in = Family::new(
        "flowgate_frontend_received_bytes_total",
        "Bytes received from clients.",
        COUNTER,
    );
    let mut bytes_out = Family::new(
        "flowgate_frontend_sent_bytes_total",
        "Bytes sent to clients.",
        COUNTER,
    );
    let mut handshake_failures = Family::new(
        "flowgate_frontend_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out.",
        COUNTER,
    );
    for frontend in runtime.frontends() {
        let labels = [("frontend", &*frontend.name)];
        let stats = &frontend.stats;
        connections.counter(&labels, stats.connections.load(Ordering::Relaxed) as f64);
        active.gauge(
            &labels,
            stats.active_connections.load(Ordering::Relaxed) as f64,
        );
        requests.counter(&labels, stats.requests.load(Ordering::Relaxed) as f64);
        bytes_in.counter(&labels, stats.bytes_in.load(Ordering::Relaxed) as f64);
        bytes_out.counter(&labels, stats.bytes_out.load(Ordering::Relaxed) as f64);
        handshake_failures.counter(
            &labels,
            stats.tls_handshake_failures.load(Ordering::Relaxed) as f64,
        );
    }

    let mut thread_connections = Family::new(
        "flowgate_thread_connections",
        "Client connections each serving thread serves now (global.threads).",
        GAUGE,
    );
    for (thread, count) in threads.connections().into_iter().enumerate() {
        thread_connections.gauge(&[("thread", &thread.to_string())], count as f64);
    }

    let mut reload_results = Family::new(
        "flowgate_config_reloads_total",
        "Configuration reloads by result.",
        COUNTER,
    );
    reload_results.counter(
        &[("result", "success")],
        reloads.successes.load(Ordering::Relaxed) as f64,
    );
    reload_results.counter(
        &[("result", "failure")],
        reloads.failures.load(Ordering::Relaxed) as f64,
    );
    let mut generation = Family::new(
        "flowgate_config_generation",
        "Generation of the running configuration.",
        GAUGE,
    );
    generation.gauge(&[], runtime.generation as f64);
    let mut last_success = Family::new(
        "flowgate_config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful configuration load (start included).",
        GAUGE,
    );
    last_success.gauge(
        &[],
        reloads.last_success_unix.load(Ordering::Relaxed) as f64,
    );
    let mut reload_seconds = Family::new(
        "flowgate_config_reload_duration_seconds",
        "Time to validate and apply a configuration.",
        HISTOGRAM,
    );
    reload_seconds.histogram(&[], &reloads.duration);

    let mut log_dropped = Family::new(
        "flowgate_access_log_dropped_total",
        "Access log entries dropped because the writer could not keep up.",
        COUNTER,
    );
    log_dropped.counter(&[], crate::access_log::dropped() as f64);

    let families: Vec<MetricFamily> = [
        up,
        state,
        in_flight,
        weight,
        check_failures,
        check_seconds,
        transitions,
        responses,
        connect_errors,
        response_seconds,
        queue_length,
        queue_seconds,
        retries,
        connections,
        active,
        requests,
        bytes_in,
        bytes_out,
        handshake_failures,
        thread_connections,
        reload_results,
        generation,
        last_success,
        reload_seconds,
        log_dropped,
    ]
    .into_iter()
    .map(Family::finish)
    .filter(|family| !family.get_metric().is_empty())
    .collect();
    let mut text = String::new();
    if let Err(err) = prometheus::TextEncoder::new().encode_utf8(&families, &mut text) {
        tracing::warn!(error = %err, "cannot encode metrics");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_counts_reach_the_shared_counter_in_steps_and_in_full_when_flushed() {
        let shared = AtomicU64::new(0);
        let mut count = BatchedCount::default();
        count.add(BatchedCount::STEP - 1, &shared);
        assert_eq!(shared.load(Ordering::Relaxed), 0, "below one step");
        count.add(1, &shared);
        assert_eq!(shared.load(Ordering::Relaxed), BatchedCount::STEP);
        count.add(100, &shared);
        assert_eq!(count.total(), BatchedCount::STEP + 100);
        count.flush(&shared);
        assert_eq!(shared.load(Ordering::Relaxed), BatchedCount::STEP + 100);
        count.flush(&shared);
        assert_eq!(
            shared.load(Ordering::Relaxed),
            BatchedCount::STEP + 100,
            "once"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = AtomicHistogram::default();
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(40));
        histogram.observe(Duration::from_secs(61));
        histogram.observe(Duration::from_secs(1000));
        let proto = histogram.to_proto();
        let counts: Vec<u64> = proto
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect();
        assert_eq!(counts[0], 1, "<= 1ms");
        assert_eq!(counts[5], 2, "<= 50ms");
        assert_eq!(counts[14], 2, "<= 60s");
        assert_eq!(counts[15], 3, "<= 120s");
        assert_eq!(proto.get_sample_count(), 4);
        assert!((proto.get_sample_sum() - 1061.0405).abs() < 1e-6);
    }

    #[test]
    fn code_classes() {
        assert_eq!(CODE_CLASSES[code_class(101)], "1xx");
        assert_eq!(CODE_CLASSES[code_class(204)], "2xx");
        assert_eq!(CODE_CLASSES[code_class(503)], "5xx");
        assert_eq!(CODE_CLASSES[code_class(999)], "5xx");
    }
}
