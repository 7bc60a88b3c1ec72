//! `herald seed --count N`: inserts valid pending mock messages in batches, with a progress bar.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use herald_core::Settings;
use herald_messenger_api::cache::SentCache;
use herald_messenger_api::domain::Draft;
use herald_messenger_api::metrics::MessengerMetrics;
use herald_messenger_api::service::{
    Admission, Callbacks, KeyRates, MessengerService, Receipts, RetryPolicy, MAX_BATCH,
};
use herald_messenger_api::store::MessageStore;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;

const TEXTS: &[&str] = &[
    "Your order has shipped and will arrive tomorrow.",
    "Your verification code is {n}.",
    "Reminder: your appointment is at 10:00 tomorrow.",
    "Payment received, thank you!",
    "Siparişiniz yola çıktı. Teşekkürler!",
    "Your parcel {n} is out for delivery.",
];

/// A valid mock message; `n` makes it distinct.
pub fn mock(n: u64) -> (String, String) {
    let mut rng = rand::rng();
    let to = format!("+90{}{:09}", 5, rng.random_range(0..1_000_000_000u64));
    let text = TEXTS[(n as usize) % TEXTS.len()].replace("{n}", &format!("{:06}", rng.random_range(0..1_000_000)));
    (to, text)
}

/// Inserts `count` messages; never deletes anything.
pub async fn run(settings: &Settings, count: u64) -> anyhow::Result<()> {
    let db = herald_core::mongo::connect(&settings.mongo, "herald-seed").await?;
    let store = MessageStore::new(&db);
    store
        .ensure_indexes()
        .await
        .context("Failed to reach MongoDB (is it running? build/local-services.sh up)")?;
    // Into a fresh database the counts start exact, and the seeding keeps them so: the API
    // that starts on it next needs no recount of what was seeded.
    store.start_counts_if_empty().await?;
    let bar = ProgressBar::new(count);
    bar.set_style(
        ProgressStyle::with_template("{spinner} seeding [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .map_err(|e| anyhow::anyhow!(e))?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    // Through the service, as the batch create is: the same validation, counts kept as it writes.
    // Seeding is an operator's deliberate load: admission control does not apply to it.
    let metrics = MessengerMetrics::new()?;
    let admission = Arc::new(Admission::new(
        store.clone(),
        0,
        KeyRates::none(),
        metrics.admission_rejected.clone(),
    ));
    let callbacks = Arc::new(Callbacks::new(store.clone(), settings, metrics.callbacks.clone()));
    let receipts = Arc::new(Receipts::new(store.clone(), callbacks.clone(), settings, &metrics));
    let service = MessengerService::new(
        store,
        SentCache::new(&settings.redis)?,
        RetryPolicy::from_settings(settings),
        metrics,
        admission,
        callbacks,
        receipts,
    );
    let mut done = 0;
    while done < count {
        let size = (count - done).min(MAX_BATCH as u64);
        let mocks: Vec<(String, String)> = (done..done + size).map(mock).collect();
        let drafts: Vec<Draft<'_>> = mocks
            .iter()
            .map(|(to, content)| Draft {
                to,
                content,
                send_at: None,
                expires_at: None,
                provider: None,
                callback_url: None,
            })
            .collect();
        service
            .create_batch(&drafts)
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .context("Failed to insert mock messages")?;
        done += size;
        bar.set_position(done);
    }
    bar.finish_and_clear();
    println!(
        "seeded {count} pending messages into {}.messages",
        settings.mongo.database
    );
    Ok(())
}
