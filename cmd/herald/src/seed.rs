//! `herald seed --count N`: inserts valid pending mock messages in batches, with a progress bar.

use std::time::Duration;

use anyhow::Context;
use herald_core::Settings;
use herald_messenger_api::domain::{self, MessageDoc};
use herald_messenger_api::service::Rules;
use herald_messenger_api::store::MessageStore;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;

const BATCH: u64 = 1000;

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
    let bar = ProgressBar::new(count);
    bar.set_style(
        ProgressStyle::with_template("{spinner} seeding [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .map_err(|e| anyhow::anyhow!(e))?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let limits = Rules::from_settings(settings).limits();
    let mut done = 0;
    while done < count {
        let size = (count - done).min(BATCH);
        let now = bson::DateTime::now();
        let docs = (done..done + size)
            .map(|n| {
                let (to, content) = mock(n);
                let draft = domain::Draft {
                    to: &to,
                    content: &content,
                    send_at: None,
                    expires_at: None,
                };
                let valid = domain::validate(draft, limits, now.to_chrono())
                    .map_err(|e| anyhow::anyhow!("mock message {n} is invalid: {e}"))?;
                Ok(MessageDoc::new_pending(valid, None, now))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        store
            .insert_many(&docs)
            .await
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
