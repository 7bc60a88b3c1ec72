//! Layered configuration loading into typed settings.
//!
//! A configuration is read from layers, each overriding the one before: `default.toml` →
//! `<env>.toml` → environment variables named `<PREFIX>__<SECTION>__<KEY>`. Each file may be
//! compiled into the program ([`Layers::builtin`]) and also present in `<dir>`: the built-in
//! text comes first and the file on disk, when there is one, overrides it key by key, so a
//! program runs from any folder while an operator can still override any value in a file. A
//! file that is neither built in nor on disk is an error. Keys listed as lists accept
//! comma-separated values in the environment (`HERALD__AUTH__API_KEYS=one,two`). The crate
//! knows nothing about the application; it returns whatever `serde` type the caller asks for.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;

pub use secrecy::{ExposeSecret, SecretString};

/// Where a configuration comes from.
#[derive(Debug, Clone)]
pub struct Layers {
    /// Folder holding `default.toml` and `<env>.toml`.
    pub dir: PathBuf,
    /// Environment name: selects `<env>.toml`.
    pub env: String,
    /// Prefix of environment variables, without the trailing `__` (e.g. `HERALD`).
    pub env_prefix: String,
    /// Dotted keys whose environment value is a comma-separated list.
    pub list_keys: Vec<String>,
    /// Files compiled into the program, by name without `.toml`.
    pub builtin: Vec<(String, &'static str)>,
}

/// Where one layer's values came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file compiled into the program, by name (`default.toml`).
    Builtin(String),
    /// A file on disk.
    File(PathBuf),
    /// `<PREFIX>__*` environment variables, by name (values are not kept: they may be secret).
    Environment(Vec<String>),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Builtin(name) => write!(f, "{name} (built in)"),
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Environment(names) => write!(f, "environment: {}", names.join(", ")),
        }
    }
}

/// Why a configuration could not be loaded. The message is one line and names the key or file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A required file is missing.
    #[error("configuration file {0} not found")]
    MissingFile(PathBuf),
    /// A file could not be parsed, or a value does not fit its key.
    #[error("{0}")]
    Invalid(String),
}

impl Layers {
    /// Layers for `dir` and `env` with the given environment prefix and list keys.
    pub fn new(dir: impl Into<PathBuf>, env: impl Into<String>, env_prefix: &str) -> Self {
        Self {
            dir: dir.into(),
            env: env.into(),
            env_prefix: env_prefix.to_owned(),
            list_keys: Vec::new(),
            builtin: Vec::new(),
        }
    }

    /// Compiles `text` in as the file `<name>.toml`; a file of that name in the folder then
    /// overrides it rather than replacing it.
    pub fn builtin(mut self, name: &str, text: &'static str) -> Self {
        self.builtin.push((name.to_owned(), text));
        self
    }

    /// Declares a dotted key whose environment value is split on commas.
    pub fn list_key(mut self, key: &str) -> Self {
        self.list_keys.push(key.to_owned());
        self
    }

    /// Loads and deserializes the layers into `T`, reading the process environment.
    pub fn load<T: DeserializeOwned>(&self) -> Result<T, LoadError> {
        self.load_with_env(std::env::vars())
    }

    /// Like [`Layers::load`], with the environment given explicitly (tests use this so they
    /// never touch the process environment).
    pub fn load_with_env<T, I>(&self, vars: I) -> Result<T, LoadError>
    where
        T: DeserializeOwned,
        I: IntoIterator<Item = (String, String)>,
    {
        self.load_traced(vars).map(|(value, _)| value)
    }

    /// Like [`Layers::load_with_env`], also saying which layers were read, in order.
    pub fn load_traced<T, I>(&self, vars: I) -> Result<(T, Vec<Source>), LoadError>
    where
        T: DeserializeOwned,
        I: IntoIterator<Item = (String, String)>,
    {
        let prefix = format!("{}__", self.env_prefix);
        let source: config::Map<String, String> = vars.into_iter().filter(|(k, _)| k.starts_with(&prefix)).collect();
        let mut builder = Config::builder();
        let mut sources = Vec::new();
        for name in ["default", self.env.as_str()] {
            let layer = self.file(name)?;
            if let Some(text) = layer.builtin {
                builder = builder.add_source(File::from_str(text, FileFormat::Toml));
                sources.push(Source::Builtin(format!("{name}.toml")));
            }
            if let Some(path) = layer.path {
                builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
                sources.push(Source::File(path));
            }
        }
        if !source.is_empty() {
            let mut names: Vec<String> = source.keys().cloned().collect();
            names.sort();
            sources.push(Source::Environment(names));
        }
        let mut environment = Environment::with_prefix(&self.env_prefix)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(source));
        if !self.list_keys.is_empty() {
            environment = environment.list_separator(",");
            for key in &self.list_keys {
                environment = environment.with_list_parse_key(key);
            }
        }
        builder
            .add_source(environment)
            .build()
            .and_then(Config::try_deserialize)
            .map(|value| (value, sources))
            .map_err(|e| LoadError::Invalid(one_line(&e.to_string())))
    }

    /// The built-in text and the file on disk for `<name>.toml`; at least one must exist.
    fn file(&self, name: &str) -> Result<Layer, LoadError> {
        let path = self.dir.join(format!("{name}.toml"));
        let builtin = self.builtin.iter().find(|(n, _)| n == name).map(|(_, text)| *text);
        let on_disk = Path::new(&path).is_file();
        if builtin.is_none() && !on_disk {
            return Err(LoadError::MissingFile(path));
        }
        Ok(Layer {
            builtin,
            path: on_disk.then_some(path),
        })
    }
}

struct Layer {
    builtin: Option<&'static str>,
    path: Option<PathBuf>,
}

/// Deserializes a list that may also be given as one bare value. Needed for list keys set from
/// the environment: `config` parses `KEY=5` as the number 5, not the list `[5]`.
///
/// Use with `#[serde(deserialize_with = "layered_config::one_or_many")]`.
pub fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    use serde::de::{self, IntoDeserializer, SeqAccess, Visitor};
    use std::marker::PhantomData;

    struct OneOrMany<T>(PhantomData<T>);

    impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for OneOrMany<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list or a single value")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|item| vec![item])
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|item| vec![item])
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|item| vec![item])
        }
    }

    deserializer.deserialize_any(OneOrMany(PhantomData))
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Sample {
        server: Server,
        auth: Auth,
    }
    #[derive(Debug, Deserialize)]
    struct Server {
        port: u16,
        host: String,
    }
    #[derive(Debug, Deserialize)]
    struct Auth {
        #[serde(deserialize_with = "one_or_many")]
        keys: Vec<SecretString>,
    }

    fn dir_with(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("layered-config-{}", rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body) in files {
            std::fs::write(dir.join(name), body).unwrap();
        }
        dir
    }

    fn rand_suffix() -> String {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
    }

    const DEFAULT: &str = "[server]\nport = 3000\nhost = \"127.0.0.1\"\n[auth]\nkeys = [\"a\"]\n";

    #[test]
    fn the_env_file_overrides_the_default_file() {
        let dir = dir_with(&[("default.toml", DEFAULT), ("test.toml", "[server]\nport = 4000\n")]);
        let s: Sample = Layers::new(&dir, "test", "APP").load_with_env(vec![]).unwrap();
        assert_eq!(s.server.port, 4000);
        assert_eq!(s.server.host, "127.0.0.1");
    }

    #[test]
    fn environment_variables_override_both_files_and_lists_split_on_commas() {
        let dir = dir_with(&[("default.toml", DEFAULT), ("test.toml", "[server]\nport = 4000\n")]);
        let vars = vec![
            ("APP__SERVER__PORT".to_owned(), "5000".to_owned()),
            ("APP__AUTH__KEYS".to_owned(), "one,two".to_owned()),
            ("OTHER__SERVER__PORT".to_owned(), "1".to_owned()),
        ];
        let s: Sample = Layers::new(&dir, "test", "APP")
            .list_key("auth.keys")
            .load_with_env(vars)
            .unwrap();
        assert_eq!(s.server.port, 5000);
        let keys: Vec<&str> = s.auth.keys.iter().map(|k| k.expose_secret()).collect();
        assert_eq!(keys, ["one", "two"]);
    }

    #[test]
    fn a_list_key_given_one_value_is_a_list_of_one() {
        let dir = dir_with(&[("default.toml", DEFAULT), ("test.toml", "")]);
        let vars = vec![("APP__AUTH__KEYS".to_owned(), "only".to_owned())];
        let s: Sample = Layers::new(&dir, "test", "APP")
            .list_key("auth.keys")
            .load_with_env(vars)
            .unwrap();
        assert_eq!(s.auth.keys.len(), 1);
        assert_eq!(s.auth.keys[0].expose_secret(), "only");
    }

    #[test]
    fn a_bad_value_names_its_key_on_one_line() {
        let dir = dir_with(&[("default.toml", DEFAULT), ("test.toml", "")]);
        let vars = vec![("APP__SERVER__PORT".to_owned(), "not-a-port".to_owned())];
        let err = Layers::new(&dir, "test", "APP")
            .load_with_env::<Sample, _>(vars)
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.port"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn a_missing_env_file_is_reported_by_path() {
        let dir = dir_with(&[("default.toml", DEFAULT)]);
        let err = Layers::new(&dir, "staging", "APP")
            .load_with_env::<Sample, _>(vec![])
            .unwrap_err();
        assert!(err.to_string().contains("staging.toml"), "{err}");
    }

    #[test]
    fn built_in_files_need_no_folder_and_files_on_disk_override_them_key_by_key() {
        let nowhere = std::env::temp_dir().join(format!("layered-config-none-{}", rand_suffix()));
        let layers = Layers::new(&nowhere, "test", "APP")
            .builtin("default", DEFAULT)
            .builtin("test", "[server]\nport = 4000\n");
        let (s, sources): (Sample, _) = layers.load_traced(vec![]).unwrap();
        assert_eq!((s.server.port, s.server.host.as_str()), (4000, "127.0.0.1"));
        assert_eq!(
            sources,
            [
                Source::Builtin("default.toml".into()),
                Source::Builtin("test.toml".into())
            ]
        );

        // A folder holding only an override of one key: the rest still comes from the built-ins.
        let dir = dir_with(&[("default.toml", "[server]\nhost = \"0.0.0.0\"\n")]);
        let vars = vec![("APP__AUTH__KEYS".to_owned(), "k".to_owned())];
        let (s, sources): (Sample, _) = Layers::new(&dir, "test", "APP")
            .builtin("default", DEFAULT)
            .builtin("test", "[server]\nport = 4000\n")
            .load_traced(vars)
            .unwrap();
        assert_eq!((s.server.port, s.server.host.as_str()), (4000, "0.0.0.0"));
        assert_eq!(sources[1], Source::File(dir.join("default.toml")));
        assert_eq!(sources[3], Source::Environment(vec!["APP__AUTH__KEYS".into()]));
        assert_eq!(sources.len(), 4);

        // An environment neither built in nor on disk is still an error that names the file.
        let err = Layers::new(&nowhere, "staging", "APP")
            .builtin("default", DEFAULT)
            .load_with_env::<Sample, _>(vec![])
            .unwrap_err();
        assert!(err.to_string().contains("staging.toml"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let dir = dir_with(&[("default.toml", DEFAULT), ("test.toml", "")]);
        let s: Sample = Layers::new(&dir, "test", "APP").load_with_env(vec![]).unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("\"a\""), "{debug}");
    }
}
