//! The Job Scheduler's Prometheus metrics.

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric of the service, in its own registry.
#[derive(Clone)]
pub struct SchedulerMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// HTTP requests by route and status.
    pub http: herald_core::http::HttpMetrics,
    /// Deliveries by outcome: accepted, retryable, permanent, released, expired.
    pub deliveries: IntCounterVec,
    /// `herald_callbacks_sent_total{result}`: status callbacks this replica POSTed or held.
    pub callbacks: IntCounterVec,
    /// Provider answers that accepted without a parsable `messageId`.
    pub accepted_without_id: IntCounter,
    /// Webhook latency by provider and outcome.
    pub webhook_latency: HistogramVec,
    /// Requests to providers by provider and outcome (accepted, retryable, permanent,
    /// misconfigured).
    pub provider_requests: IntCounterVec,
    /// Messages sent on to the next provider of their route, by the provider they left and why
    /// (paused, misconfigured, unreachable).
    pub failovers: IntCounterVec,
    /// Messages given back to wait because every provider they may go to is paused.
    pub waiting_for_provider: IntCounter,
    /// Runs by result: completed, skipped, error.
    pub runs: IntCounterVec,
    /// Unix time of the last run that was not skipped.
    pub last_run: Gauge,
    /// 1 while the job is working, as this replica last saw it.
    pub working: IntGauge,
    /// Messenger API calls that failed, by operation.
    pub messenger_errors: IntCounterVec,
    /// Claims extended because their outcome reports were slow to land.
    pub claims_extended: prometheus::IntCounter,
    /// The provider pause.
    pub pause: crate::provider::PauseMetrics,
    /// The shared rate limit.
    pub limiter: crate::limiter::LimiterMetrics,
}

impl SchedulerMetrics {
    /// Creates and registers everything.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("herald".into()), None)?;
        let http = herald_core::http::HttpMetrics::new(&registry)?;
        let deliveries = IntCounterVec::new(Opts::new("deliveries_total", "Deliveries by outcome."), &["outcome"])?;
        let callbacks = IntCounterVec::new(
            Opts::new(
                "callbacks_sent_total",
                "Status callbacks by result: delivered (2xx), failed (retried by the schedule), refused (address not allowed), deferred (host paused or over its rate), host_paused (a host's pause began).",
            ),
            &["result"],
        )?;
        let accepted_without_id = IntCounter::new(
            "webhook_accepted_without_message_id_total",
            "Provider answers that accepted a message without a parsable messageId.",
        )?;
        let webhook_latency = HistogramVec::new(
            HistogramOpts::new("webhook_latency_seconds", "Provider webhook latency.")
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["provider", "outcome"],
        )?;
        let provider_requests = IntCounterVec::new(
            Opts::new(
                "provider_requests_total",
                "Requests to providers, by provider and outcome.",
            ),
            &["provider", "outcome"],
        )?;
        let failovers = IntCounterVec::new(
            Opts::new(
                "provider_failovers_total",
                "Messages sent on to the next provider of their route, by the provider they left and why.",
            ),
            &["provider", "reason"],
        )?;
        let waiting_for_provider = IntCounter::new(
            "messages_waiting_for_provider_total",
            "Messages given back to wait because every provider they may go to is paused.",
        )?;
        let runs = IntCounterVec::new(Opts::new("job_runs_total", "Job runs by result."), &["result"])?;
        let last_run = Gauge::new(
            "job_last_run_timestamp_seconds",
            "Unix time of the last run that was not skipped.",
        )?;
        let working = IntGauge::new("job_working", "1 while the sending job is working.")?;
        let messenger_errors = IntCounterVec::new(
            Opts::new(
                "messenger_api_errors_total",
                "Messenger API calls that failed, by operation.",
            ),
            &["operation"],
        )?;
        let claims_extended = prometheus::IntCounter::new(
            "claims_extended_total",
            "Claims of sent messages extended with under a third of their lease left, their outcome reports slow to land.",
        )?;
        let pause = crate::provider::PauseMetrics {
            paused: IntGaugeVec::new(
                Opts::new("provider_paused", "1 while this replica sees the provider paused."),
                &["provider"],
            )?,
            pauses: IntCounterVec::new(
                Opts::new(
                    "provider_pauses_total",
                    "Provider pauses this replica set, by provider and reason: retry_after, failures, probe_failed, misconfigured.",
                ),
                &["provider", "reason"],
            )?,
            probes: IntCounterVec::new(
                Opts::new(
                    "provider_probes_total",
                    "Probe sends after a pause, by provider and result: open (sending resumed), paused (paused again).",
                ),
                &["provider", "result"],
            )?,
        };
        let limiter = crate::limiter::LimiterMetrics {
            waited: prometheus::Counter::new(
                "rate_limit_wait_seconds_total",
                "Seconds sends waited for the shared rate limit.",
            )?,
            fallback: IntGauge::new(
                "rate_limit_fallback",
                "1 while Redis is unreachable and this replica limits itself to its share.",
            )?,
            too_late: IntCounter::new(
                "rate_limit_released_total",
                "Messages given back unsent because the rate limit left no slot before their claim's deadline.",
            )?,
        };
        registry.register(Box::new(pause.paused.clone()))?;
        registry.register(Box::new(pause.pauses.clone()))?;
        registry.register(Box::new(pause.probes.clone()))?;
        registry.register(Box::new(limiter.waited.clone()))?;
        registry.register(Box::new(limiter.fallback.clone()))?;
        registry.register(Box::new(limiter.too_late.clone()))?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(callbacks.clone()))?;
        registry.register(Box::new(accepted_without_id.clone()))?;
        registry.register(Box::new(webhook_latency.clone()))?;
        registry.register(Box::new(provider_requests.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(waiting_for_provider.clone()))?;
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(last_run.clone()))?;
        registry.register(Box::new(working.clone()))?;
        registry.register(Box::new(messenger_errors.clone()))?;
        registry.register(Box::new(claims_extended.clone()))?;
        Ok(Self {
            registry,
            http,
            deliveries,
            callbacks,
            accepted_without_id,
            webhook_latency,
            provider_requests,
            failovers,
            waiting_for_provider,
            runs,
            last_run,
            working,
            messenger_errors,
            claims_extended,
            pause,
            limiter,
        })
    }
}
