//! Wiring, top to bottom: settings → clients → job → schedule → control → routes → a bound
//! server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use herald_core::apidoc::{ApiDoc, Rules};
use herald_core::audit::AuditStore;
use herald_core::http::{self, Bound};
use herald_core::settings::Settings;
use poem::endpoint::BoxEndpoint;
use poem::{EndpointExt, Response, Route};
use poem_openapi::OpenApiService;
use telemetry::Chain;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::callbacks::{Courier, CourierParts, SystemLookup};
use crate::control::{ControlParts, JobControl};
use crate::job::{JobConfig, JobParts, SendingJob};
use crate::lanes::{LaneParts, Lanes};
use crate::messenger_client::MessengerClient;
use crate::metrics::SchedulerMetrics;
use crate::routes::{JobApi, ProbesApi};
use crate::schedule::{Cron, Trigger};
use crate::store::JobStore;

/// How long in-flight HTTP requests may take after a shutdown signal (a Stop may be waiting
/// for a run).
const GRACE: Duration = Duration::from_secs(30);

/// A built Job Scheduler, bound and scheduled.
pub struct Application {
    bound: Bound,
    app: BoxEndpoint<'static, Response>,
    control: Arc<JobControl>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// This replica's worker id: configured, or `<hostname>-<random>`.
pub fn worker_id(settings: &Settings) -> String {
    let configured = settings.job_scheduler.worker_id.trim();
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "herald".into());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

/// Everything but the bound server: the job, its schedule (not yet ticking) and its control.
struct Parts {
    control: Arc<JobControl>,
    audit: AuditStore,
    store: JobStore,
    metrics: SchedulerMetrics,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

async fn parts(settings: &Settings) -> anyhow::Result<Parts> {
    let db = herald_core::mongo::connect(&settings.mongo, "herald-job-scheduler").await?;
    let messenger = MessengerClient::new(&settings.messenger_api.url, settings.worker_key().clone())
        .context("Failed to build the Messenger API client")?;
    let routing = settings.routing()?;
    let js = &settings.job_scheduler;
    let config = JobConfig {
        worker_id: worker_id(settings),
        batch_size: js.batch_size,
        concurrency: js.concurrency as usize,
        lease: Duration::from_secs(js.lease_seconds),
        webhook_timeout: routing.longest_timeout(),
        drain: js.drain,
    };
    let stop_wait = settings.stop_wait();
    let metrics = SchedulerMetrics::new().context("Failed to register metrics")?;
    let store = JobStore::new(&db);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    // The limiters answer fast or step aside: a slow Redis must not stall the sends.
    let limiter_timeout = Duration::from_millis(settings.redis.timeout_ms.min(250));
    let lanes = Arc::new(Lanes::new(
        routing,
        &LaneParts {
            db: &db,
            redis: herald_core::redis_conn::lazy_connection(&settings.redis, limiter_timeout)?,
            key_prefix: &settings.redis.key_prefix,
            worker: &config.worker_id,
            limiter_timeout,
            metrics: &metrics,
        },
    )?);
    let job = Arc::new(SendingJob::new(
        JobParts {
            store: store.clone(),
            messenger: messenger.clone(),
            lanes: lanes.clone(),
        },
        config,
        metrics.clone(),
        shutdown.clone(),
    ));
    let trigger = Trigger::new(job.clone(), tracker.clone());
    let tick = trigger.clone();
    let cron = Cron::new(&js.schedule, move || tick.fire()).await?;
    let control = Arc::new(JobControl::new(ControlParts {
        job,
        store: store.clone(),
        metrics: metrics.clone(),
        trigger,
        cron,
        messenger,
        lanes,
        run_on_start: js.run_on_start,
        stop_wait,
    }));
    Ok(Parts {
        control,
        audit: AuditStore::new(&db, "job-scheduler"),
        store,
        metrics,
        tracker,
        shutdown,
    })
}

fn api_service(control: &Arc<JobControl>, audit: &AuditStore) -> OpenApiService<(JobApi, ProbesApi), ()> {
    let apis = (
        JobApi {
            control: control.clone(),
            audit: audit.clone(),
        },
        ProbesApi {
            control: control.clone(),
        },
    );
    OpenApiService::new(apis, "Herald Job Scheduler", env!("CARGO_PKG_VERSION")).description(
        "Runs the sending job: on its schedule it claims due messages from the Messenger API, \
         POSTs each to the provider webhook and commits or fails it. Start/stop is shared by \
         every replica. Every route but the probes needs `Authorization: Bearer <key>`.",
    )
}

/// The OpenAPI document as pretty JSON.
pub async fn openapi_json(settings: &Settings) -> anyhow::Result<String> {
    let parts = parts(settings).await?;
    Ok(
        ApiDoc::of(&api_service(&parts.control, &parts.audit), Rules::of(settings))
            .spec()
            .to_owned(),
    )
}

impl Application {
    /// Connects (lazily), prepares `job_state`/`job_runs`, starts the schedule, binds.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        herald_core::errors::check_catalogue(herald_core::errors::CATALOGUE).map_err(anyhow::Error::msg)?;
        let Parts {
            control,
            audit,
            store,
            metrics,
            tracker,
            shutdown,
        } = parts(settings).await?;
        let worker = control.job().worker_id().to_owned();
        let history = Duration::from_secs(settings.job_scheduler.run_history_days * 86_400);
        if let Err(error) = store.ensure_indexes(history).await {
            tracing::warn!(error = %Chain(&error), "could not create job_runs indexes; runs will report MongoDB errors until it is back");
        }
        // The audit is kept as long as the run history (the API makes the same index).
        if let Err(error) = audit.ensure_indexes(history).await {
            tracing::warn!(error = %Chain(&error), "could not create the audit index yet");
        }
        let working = match store.init_state(&worker).await {
            Ok(state) => {
                if !state.working {
                    tracing::info!(changed_by = %state.changed_by, "the sending job is stopped (persisted); start it to send");
                }
                state.working
            }
            Err(error) => {
                tracing::warn!(error = %Chain(&error), "could not read the job state yet");
                false
            }
        };
        metrics.working.set(i64::from(working));
        let courier = Arc::new(Courier::new(CourierParts {
            messenger: herald_core::peer::PeerClient::new(
                &settings.messenger_api.url,
                settings.worker_key().clone(),
                crate::messenger_client::CALL_TIMEOUT,
            )?,
            redis: herald_core::redis_conn::lazy_connection(&settings.redis, Duration::from_millis(250))?,
            key_prefix: settings.redis.key_prefix.clone(),
            worker: worker.clone(),
            settings: settings.callbacks.clone(),
            max_retry_after: Duration::from_secs(settings.webhook.max_retry_after_seconds),
            lookup: Arc::new(SystemLookup),
            counted: metrics.callbacks.clone(),
        })?);
        courier.spawn(&tracker, shutdown.clone());
        control.cron().start().await?;
        if working && settings.job_scheduler.run_on_start {
            control.trigger();
        }
        if settings.job_scheduler.drain {
            let every = Duration::from_millis(settings.job_scheduler.idle_poll_ms);
            control.runs_trigger().poll_while_idle(every, shutdown.clone());
        }
        let bound = http::bind(&settings.job_scheduler.host, settings.job_scheduler.port)
            .await?
            .idle_timeout(Duration::from_secs(settings.job_scheduler.idle_timeout_seconds));
        tracing::info!(
            address = %bound.addr,
            worker,
            schedule = %settings.job_scheduler.schedule,
            providers = %settings
                .routing()
                .map(|r| r.providers().iter().map(|p| format!("{} ({})", p.name, p.webhook.url)).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            "job scheduler listening; Swagger UI at /job-scheduler/swagger"
        );
        let api = api_service(&control, &audit);
        let doc = ApiDoc::of(&api, Rules::of(settings));
        let allowed = http::AllowedMethods::from_openapi(doc.spec());
        let registry = metrics.registry.clone();
        let metrics_endpoint = poem::endpoint::make_sync(move |_| http::render_metrics(&registry));
        let routes = Route::new()
            .at("/job-scheduler/openapi.json", doc.spec_endpoint())
            .nest("/job-scheduler/swagger", doc.swagger_ui())
            .at("/metrics", metrics_endpoint)
            .nest("/", api)
            .data(settings.api_keys()?);
        let app = http::edge(
            routes,
            settings.job_scheduler.max_body_bytes,
            metrics.http.clone(),
            allowed,
        )
        .boxed();
        Ok(Self {
            bound,
            app,
            control,
            shutdown,
            tracker,
        })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.bound.addr
    }

    /// The port it listens on (the real one when 0 was asked for).
    pub fn port(&self) -> u16 {
        self.bound.addr.port()
    }

    /// The control surface (tests call `job().run_once()` through it).
    pub fn control(&self) -> Arc<JobControl> {
        self.control.clone()
    }

    /// Serves until `signal` completes; then stops the schedule, lets the run in flight finish
    /// its started sends and commit them, releases claims it had not started, and closes.
    pub async fn run_until_stopped<S>(self, signal: S) -> std::io::Result<()>
    where
        S: Future<Output = ()> + Send,
    {
        let token = self.shutdown.clone();
        let server = http::serve(
            self.bound,
            self.app,
            async move {
                signal.await;
                token.cancel();
            },
            GRACE,
        );
        let control = self.control.clone();
        let tracker = self.tracker.clone();
        let shutdown = self.shutdown.clone();
        let drain = async move {
            shutdown.cancelled().await;
            control.cron().shutdown().await;
            tracker.close();
            tracker.wait().await;
            tracing::info!("sending job drained");
        };
        let (served, ()) = tokio::join!(server, drain);
        tracing::info!("job scheduler stopped");
        served
    }
}
