//! Wiring: settings → clients → service → routes → a bound server.

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
use poem::{get, EndpointExt, Response, Route};
use poem_openapi::OpenApiService;

use crate::cache::SentCache;
use crate::events::{EventFeed, SubscriberSlots};
use crate::metrics::MessengerMetrics;
use crate::routes::audit::AuditApi;
use crate::routes::callbacks::CallbacksApi;
use crate::routes::console;
use crate::routes::job::JobApi;
use crate::routes::live::LiveApi;
use crate::routes::messages::MessagesApi;
use crate::routes::probes::ProbesApi;
use crate::routes::receipts::ReceiptsApi;
use crate::routes::socket::{self, SocketTiming};
use crate::routes::worker::WorkerApi;
use crate::service::{
    Admission, Callbacks, JobRemote, KeyRates, MessengerService, Monitor, Receipts, RetryPolicy, SchedulerClient,
    Upkeep,
};
use crate::store::MessageStore;
use telemetry::Chain;

type Apis = (
    MessagesApi,
    WorkerApi,
    CallbacksApi,
    JobApi,
    AuditApi,
    ReceiptsApi,
    LiveApi,
    ProbesApi,
);

/// How long in-flight requests may take to finish after a shutdown signal.
const GRACE: Duration = Duration::from_secs(15);

/// A built Messenger API, bound to its port and ready to run.
pub struct Application {
    bound: Bound,
    app: BoxEndpoint<'static, Response>,
    services: Services,
    /// Stops the background upkeep when the application ends or is dropped.
    upkeep: tokio_util::sync::DropGuard,
}

/// The services behind the routes, one per concern, over one database and one cache.
#[derive(Clone)]
pub struct Services {
    /// Messages and their life.
    pub messenger: Arc<MessengerService>,
    /// The sending job, through the Job Scheduler.
    pub job: Arc<JobRemote>,
    /// Stats, readiness, gauges.
    pub monitor: Arc<Monitor>,
    /// The live event feed.
    pub feed: EventFeed,
    /// The messages' repository (for start-up index creation).
    pub store: MessageStore,
    /// Counts reconciliation and retention, in the background.
    pub upkeep: Upkeep,
    /// Every metric, rendered at `/metrics`.
    pub metrics: MessengerMetrics,
    /// The audit trail of operator actions.
    pub audit: AuditStore,
    /// Live subscriptions per key.
    pub slots: SubscriberSlots,
    /// Delivery receipts from providers.
    pub receipts: Arc<Receipts>,
    /// The status-callback outbox.
    pub callbacks: Arc<Callbacks>,
}

impl Services {
    /// Builds the services (clients connect lazily; nothing waits for a server here).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let db = herald_core::mongo::connect(&settings.mongo, "herald-messenger-api").await?;
        let cache = SentCache::new(&settings.redis)?;
        // A Stop answers once runs in flight are done: wait as long as it may take.
        let scheduler = SchedulerClient::new(
            &settings.job_scheduler.url,
            settings.toggle_key().clone(),
            settings.toggle_timeout(),
        )
        .context("Failed to build the Job Scheduler client")?;
        let metrics = MessengerMetrics::new().context("Failed to register metrics")?;
        let store = MessageStore::new(&db);
        store
            .counts()
            .metrics()
            .register(&metrics.registry)
            .context("Failed to register metrics")?;
        let upkeep = Upkeep::new(
            store.clone(),
            cache.clone(),
            settings.retention.clone(),
            Duration::from_secs(settings.messenger_api.count_reconcile_seconds),
            metrics.clone(),
        );
        let admission = Arc::new(Admission::new(
            store.clone(),
            settings.messenger_api.max_due_backlog,
            KeyRates::from_settings(settings)?,
            metrics.admission_rejected.clone(),
        ));
        let policy = RetryPolicy::from_settings(settings);
        let providers = policy.providers.clone();
        let callbacks = Arc::new(Callbacks::new(store.clone(), settings, metrics.callbacks.clone()));
        let receipts = Arc::new(Receipts::new(store.clone(), callbacks.clone(), settings, &metrics));
        Ok(Self {
            messenger: Arc::new(MessengerService::new(
                store.clone(),
                cache.clone(),
                policy,
                metrics.clone(),
                admission.clone(),
                callbacks.clone(),
                receipts.clone(),
            )),
            job: Arc::new(JobRemote::new(scheduler)),
            monitor: Arc::new(Monitor::new(
                db.clone(),
                store.clone(),
                cache,
                metrics.clone(),
                providers,
                admission,
            )),
            audit: AuditStore::new(&db, "messenger-api"),
            receipts,
            callbacks,
            slots: SubscriberSlots::new(settings.events.max_subscribers_per_key),
            feed: EventFeed::new(db, settings.events.subscriber_buffer, metrics.feed.clone()),
            store,
            upkeep,
            metrics,
        })
    }

    fn api(&self, settings: &Settings) -> OpenApiService<Apis, ()> {
        let apis = (
            MessagesApi {
                service: self.messenger.clone(),
                audit: self.audit.clone(),
            },
            WorkerApi {
                service: self.messenger.clone(),
            },
            CallbacksApi {
                callbacks: self.callbacks.clone(),
                audit: self.audit.clone(),
            },
            JobApi {
                job: self.job.clone(),
                audit: self.audit.clone(),
            },
            AuditApi {
                audit: self.audit.clone(),
            },
            ReceiptsApi {
                receipts: self.receipts.clone(),
            },
            LiveApi {
                monitor: self.monitor.clone(),
                job: self.job.clone(),
                feed: self.feed.clone(),
                heartbeat: Duration::from_secs(settings.events.sse_heartbeat_seconds),
                slots: self.slots.clone(),
            },
            ProbesApi {
                monitor: self.monitor.clone(),
            },
        );
        OpenApiService::new(apis, "Herald Messenger API", env!("CARGO_PKG_VERSION")).description(
            "Stores messages in MongoDB, hands them to workers with atomic leased claims, and records \
             what the provider accepted (MongoDB, then the Redis cache). Every /api route needs \
             `Authorization: Bearer <key>`; errors answer `{status, internalCode, message}`. \
             Live status: `GET /api/messenger/events` (Server-Sent Events) or the WebSocket \
             `GET /api/messenger/ws` (key in the upgrade's `Authorization` header or a first frame \
             `{\"auth\": \"<key>\"}`); the operator console is at `/messenger/console`.",
        )
    }
}

/// The OpenAPI document as pretty JSON.
pub async fn openapi_json(settings: &Settings) -> anyhow::Result<String> {
    Ok(
        ApiDoc::of(&Services::build(settings).await?.api(settings), Rules::of(settings))
            .spec()
            .to_owned(),
    )
}

impl Application {
    /// Connects (lazily), creates indexes (in the background if MongoDB is down), binds.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        herald_core::errors::check_catalogue(herald_core::errors::CATALOGUE).map_err(anyhow::Error::msg)?;
        let services = Services::build(settings).await?;
        ensure_indexes(services.store.clone(), services.callbacks.clone()).await;
        // The audit is kept as long as the run history (the scheduler makes the same index).
        let keep = Duration::from_secs(settings.job_scheduler.run_history_days * 86_400);
        if let Err(error) = services.audit.ensure_indexes(keep).await {
            tracing::warn!(error = %Chain(&error), "could not create the audit index yet; the Job Scheduler makes it too");
        }
        if let Err(error) = services.store.start_counts_if_empty().await {
            tracing::warn!(error = %Chain(&error), "could not start the counts yet; the reconciliation will");
        }
        let upkeep = tokio_util::sync::CancellationToken::new();
        services.upkeep.spawn(upkeep.clone());
        services.receipts.clone().spawn_matcher(upkeep.clone());
        let bound = http::bind(&settings.messenger_api.host, settings.messenger_api.port)
            .await?
            .idle_timeout(Duration::from_secs(settings.messenger_api.idle_timeout_seconds));
        tracing::info!(address = %bound.addr, "messenger API listening; Swagger UI at /messenger/swagger");
        let api = services.api(settings);
        let doc = ApiDoc::of(&api, Rules::of(settings));
        let allowed = http::AllowedMethods::from_openapi(doc.spec());
        let (monitor, registry) = (services.monitor.clone(), services.metrics.registry.clone());
        let metrics = poem::endpoint::make(move |_| {
            let (monitor, registry) = (monitor.clone(), registry.clone());
            async move {
                monitor.refresh_gauges().await;
                http::render_metrics(&registry)
            }
        });
        let routes = Route::new()
            .at("/messenger/openapi.json", doc.spec_endpoint())
            .nest("/messenger/swagger", doc.swagger_ui())
            .at("/metrics", metrics)
            .at("/messenger/console", get(console::page))
            .at("/messenger/console/:file", get(console::asset))
            .at("/api/messenger/ws", get(socket::websocket))
            .nest("/", api)
            .data(settings.api_keys()?)
            .data(services.feed.clone())
            .data(services.slots.clone())
            .data(SocketTiming {
                ping: Duration::from_secs(settings.events.ws_ping_seconds),
                auth: Duration::from_secs(settings.events.ws_auth_timeout_seconds),
            });
        let app = http::edge(
            routes,
            settings.messenger_api.max_body_bytes,
            services.metrics.http.clone(),
            allowed,
        )
        .boxed();
        Ok(Self {
            bound,
            app,
            services,
            upkeep: upkeep.drop_guard(),
        })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.bound.addr
    }

    /// The bound port (the real one when 0 was asked for).
    pub fn port(&self) -> u16 {
        self.bound.addr.port()
    }

    /// The services behind the routes.
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Serves until `shutdown` completes, then drains in-flight requests.
    pub async fn run_until_stopped<S>(self, shutdown: S) -> std::io::Result<()>
    where
        S: Future<Output = ()> + Send,
    {
        let feed = self.services.feed.clone();
        let shutdown = async move {
            shutdown.await;
            // Event streams never end by themselves: end them so the drain is quick.
            feed.close();
        };
        let _upkeep = self.upkeep;
        http::serve(self.bound, self.app, shutdown, GRACE).await?;
        tracing::info!("messenger API stopped");
        Ok(())
    }
}

/// Creates the indexes now, or — when MongoDB is down at start-up — keeps trying in the
/// background so the service recovers by itself.
async fn create_indexes(store: &MessageStore, callbacks: &Callbacks) -> Result<(), crate::store::StoreError> {
    store.ensure_indexes().await?;
    callbacks.store().ensure_indexes().await
}

async fn ensure_indexes(store: MessageStore, callbacks: Arc<Callbacks>) {
    match create_indexes(&store, &callbacks).await {
        Ok(()) => {}
        Err(error) => {
            tracing::warn!(error = %Chain(&error), "could not create indexes yet; retrying in the background");
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    match create_indexes(&store, &callbacks).await {
                        Ok(()) => {
                            tracing::info!("indexes created");
                            break;
                        }
                        Err(error) => tracing::warn!(error = %Chain(&error), "could not create indexes yet"),
                    }
                }
            });
        }
    }
}
