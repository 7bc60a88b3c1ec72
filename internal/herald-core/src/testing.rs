//! Settings for integration tests: the shipped `test` environment pointed at one test's
//! database and Redis key prefix, plus any overrides.

use std::path::Path;

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
