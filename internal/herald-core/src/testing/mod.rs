//! What the integration tests of both services share: settings (the shipped `test`
//! environment pointed at one test's database and Redis key prefix, plus any overrides), the
//! test key, seeding messages through the API, and [`stack::ProcessStack`] — real `herald`
//! processes for the CLI tests, the chaos campaign and the benchmarks.

pub mod scopes;
pub mod stack;

use std::path::Path;

use serde_json::{json, Value};

pub use stack::ProcessStack;

use crate::settings::Settings;

/// The repository's `configs/` folder.
pub fn configs_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs"))
}

/// Test settings on `database` and `key_prefix`, with `HERALD__*`-style overrides.
pub fn test_settings(
    mongo_uri: &str,
    database: &str,
    redis_url: &str,
    key_prefix: &str,
    extra: &[(&str, &str)],
) -> Settings {
    let mut vars = vec![
        ("HERALD__MONGO__URI".to_owned(), mongo_uri.to_owned()),
        ("HERALD__MONGO__DATABASE".to_owned(), database.to_owned()),
        ("HERALD__REDIS__URL".to_owned(), redis_url.to_owned()),
        ("HERALD__REDIS__KEY_PREFIX".to_owned(), key_prefix.to_owned()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    match Settings::load_with_env(configs_dir(), "test", vars) {
        Ok(settings) => settings,
        Err(error) => panic!("test settings: {error:#}"),
    }
}

/// `settings` with the `[[providers]]` and `[[routes]]` of the TOML `fragment` (environment
/// variables cannot carry tables of arrays), validated.
pub fn with_providers(mut settings: Settings, fragment: &str) -> Settings {
    #[derive(serde::Deserialize)]
    struct Fragment {
        #[serde(default)]
        providers: Vec<crate::providers::ProviderSettings>,
        #[serde(default)]
        routes: Vec<crate::providers::RouteSettings>,
    }
    let parsed: Fragment = toml::from_str(fragment).unwrap_or_else(|e| panic!("providers fragment: {e}"));
    settings.providers = parsed.providers;
    settings.routes = parsed.routes;
    if let Err(error) = settings.validate() {
        panic!("providers fragment: {error}");
    }
    settings
}

/// Test settings on `env`'s database and key prefix, on the test servers, with overrides.
pub fn settings_for(env: &test_support::TestEnv, extra: &[(&str, &str)]) -> Settings {
    test_settings(
        &test_support::mongo_uri(),
        &env.database,
        &test_support::redis_url(),
        &env.key_prefix,
        extra,
    )
}

/// The API key of the `test` environment.
pub const TEST_KEY: &str = "test-api-key";

/// Creates `n` valid messages through the Messenger API at `api` (batches of 1,000) and returns
/// their ids in order.
pub async fn seed_messages(http: &test_support::Http, api: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let from = ids.len();
        let messages: Vec<Value> = (from..n.min(from + 1000))
            .map(|i| json!({"to": format!("+90555{i:07}"), "content": format!("message {i}")}))
            .collect();
        let created: Value = http
            .post_json(
                &format!("{api}/api/messenger/messages/batch"),
                &json!({"messages": messages}),
            )
            .await;
        let items = created["items"].as_array().expect("created items");
        ids.extend(items.iter().map(|m| m["id"].as_str().expect("id").to_owned()));
    }
    ids
}

/// The raw driver's claim read that benchmarks compare Herald with: the ids of the oldest
/// `limit` due messages, sorted by due time, over the whole due range (what the `claim` index
/// serves; the test server reads all of the range before applying the limit).
pub async fn raw_due_ids(
    messages: &mongodb::Collection<mongodb::bson::Document>,
    now: mongodb::bson::DateTime,
    limit: i64,
) -> mongodb::error::Result<Vec<mongodb::bson::oid::ObjectId>> {
    use futures::TryStreamExt;
    use mongodb::bson::{doc, Document};
    // One read per due status: the test server bounds an index range only under an equality
    // on the fields before it (see `MessageStore::due_ids`).
    let read = |status: &'static str| {
        messages
            .find(doc! {"status": status, "next_attempt_at": {"$lte": now}})
            .sort(doc! {"next_attempt_at": 1, "_id": 1})
            .limit(limit)
            .projection(doc! {"_id": 1, "next_attempt_at": 1})
    };
    let mut found: Vec<Document> = read("pending").await?.try_collect().await?;
    found.extend(read("processing").await?.try_collect::<Vec<Document>>().await?);
    let mut due: Vec<_> = found
        .iter()
        .filter_map(|d| Some((d.get_datetime("next_attempt_at").ok()?, d.get_object_id("_id").ok()?)))
        .collect();
    due.sort();
    Ok(due.into_iter().take(limit as usize).map(|(_, id)| id).collect())
}
