//! `herald`: one binary, one subcommand per role. Argument parsing, configuration loading,
//! telemetry and wiring only; the work lives in the `internal/` crates.

#![forbid(unsafe_code)]

mod seed;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use herald_core::auth::Scope;
use herald_core::Settings;

/// Herald: stores messages in MongoDB and sends them, two at a time, to an SMS provider.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Folder of configuration overrides: default.toml and <env>.toml found there override the
    /// built-in ones key by key; neither needs to exist.
    #[arg(long, global = true, env = "HERALD_CONFIG_DIR", default_value = "configs")]
    config_dir: PathBuf,
    /// Environment: local, docker, test or production (selects configs/<env>.toml).
    #[arg(long, global = true, env = "HERALD_ENV", default_value = "local")]
    env: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Messenger API (messages, get-two claims, commit, toggle). Default port 3000.
    MessengerApi,
    /// Run the Job Scheduler (the sending job and its start/stop). Default port 3001.
    JobScheduler,
    /// Run a local stand-in for the SMS provider webhook. Default port 8090.
    WebhookSink(SinkArgs),
    /// Insert N valid pending mock messages (never deletes anything).
    Seed(SeedArgs),
    /// Print or write both OpenAPI documents.
    Openapi(OpenapiArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check what this configuration points at: MongoDB (a replica set whose change streams
    /// open, majority writes), Redis, the other role, the providers. Exits non-zero on a
    /// failure.
    Doctor,
    /// Make API keys.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Print a fresh random key once, and the [[auth.keys]] lines with its SHA-256 digest to add
    /// to the configuration (the key itself is never stored by Herald).
    New(KeyArgs),
}

#[derive(Debug, Args)]
struct KeyArgs {
    /// The key's name: letters, digits, `.`, `_` and `-` (shown in logs, the audit, 403 errors).
    #[arg(long, value_parser = parse_key_name)]
    name: String,
    /// A scope it holds (repeat): messages:write, messages:read, worker, operator, metrics.
    #[arg(long = "scope", required = true, value_parser = parse_scope)]
    scopes: Vec<Scope>,
}

fn parse_key_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    ok.then(|| name.to_owned())
        .ok_or_else(|| "1 to 64 letters, digits, '.', '_' or '-'".to_owned())
}

fn parse_scope(name: &str) -> Result<Scope, String> {
    Scope::parse(name).ok_or_else(|| {
        let all: Vec<&str> = Scope::ALL.iter().map(|s| s.name()).collect();
        format!("one of {}", all.join(", "))
    })
}

/// `herald key new`: the key on its own line, everything else a TOML comment or table, so the
/// output can be split by a script or pasted by a person.
fn new_key(args: &KeyArgs) {
    let key = herald_core::auth::new_key();
    let scopes: Vec<&str> = Scope::ALL
        .iter()
        .filter(|s| args.scopes.contains(s))
        .map(|s| s.name())
        .collect();
    println!(
        "# The key for {:?}: shown once, Herald keeps only its digest. Give it to the client:",
        args.name
    );
    println!("{key}");
    println!("# Add to the configuration of both services:");
    println!("[[auth.keys]]");
    println!("name = \"{}\"", args.name);
    println!("sha256 = \"{}\"", herald_core::auth::digest_hex(&key));
    println!(
        "scopes = [{}]",
        scopes.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
    );
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Load and validate the configuration, print where each layer came from and the effective
    /// values as TOML with every secret redacted; exit non-zero naming the key of a bad value.
    Check,
}

#[derive(Debug, Args)]
struct SinkArgs {
    /// Added latency before answering, in milliseconds (overrides webhook_sink.latency_ms).
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Share of requests answered with --status instead of 202, 0.0..=1.0.
    #[arg(long)]
    fail_rate: Option<f64>,
    /// Status code of an injected failure.
    #[arg(long)]
    status: Option<u16>,
    /// Bind port (overrides webhook_sink.port; 0 = any free port).
    #[arg(long)]
    port: Option<u16>,
    /// Which provider to stand in for: herald, twilio, vonage, infobip or whatsapp.
    #[arg(long, default_value = "herald", value_parser = parse_sink_format)]
    format: herald_webhook_sink::SinkFormat,
    /// The key (token, password) it expects (default: webhook.auth_key).
    #[arg(long, env = "HERALD_SINK_AUTH_KEY", hide_env_values = true)]
    auth_key: Option<String>,
    /// The user it expects with basic auth (twilio, vonage).
    #[arg(long, default_value = "herald")]
    auth_user: String,
    /// Post a signed delivery receipt for every accepted message to this URL (Herald's
    /// `/api/messenger/receipts/{provider}`); see `[providers.receipts]` in docs/configuration.md.
    #[arg(long)]
    receipts_url: Option<String>,
    /// The HMAC-SHA256 secret receipts are signed with (`X-Sink-Signature`).
    #[arg(
        long,
        env = "HERALD_SINK_RECEIPTS_SECRET",
        hide_env_values = true,
        default_value = "local-dev-receipts-secret"
    )]
    receipts_secret: String,
    /// How long after accepting a message its receipt goes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    receipts_delay_ms: u64,
    /// Share of messages reported undelivered, 0.0..=1.0.
    #[arg(long, default_value_t = 0.0)]
    receipts_undelivered: f64,
    /// Share whose receipt is sent twice.
    #[arg(long, default_value_t = 0.0)]
    receipts_duplicate: f64,
    /// Share whose final receipt is followed by a late intermediate one.
    #[arg(long, default_value_t = 0.0)]
    receipts_out_of_order: f64,
    /// The `whsec_` secret(s) status callbacks to `/webhook-sink/callbacks` are checked with,
    /// comma-separated (default: callbacks.secret).
    #[arg(
        long,
        env = "HERALD_SINK_CALLBACK_SECRET",
        hide_env_values = true,
        value_delimiter = ','
    )]
    callback_secret: Vec<String>,
    /// Share whose receipt goes before the sink answers (it beats Herald's commit).
    #[arg(long, default_value_t = 0.0)]
    receipts_before_answer: f64,
    /// How long a receipt Herald does not take is retried, in seconds.
    #[arg(long, default_value_t = 300)]
    receipts_give_up_seconds: u64,
}

fn parse_sink_format(name: &str) -> Result<herald_webhook_sink::SinkFormat, String> {
    herald_webhook_sink::SinkFormat::parse(name)
        .ok_or_else(|| "one of herald, twilio, vonage, infobip, whatsapp".to_owned())
}

#[derive(Debug, Args)]
struct SeedArgs {
    /// How many messages to insert.
    #[arg(long, default_value_t = 10)]
    count: u64,
}

#[derive(Debug, Args)]
struct OpenapiArgs {
    /// Write messenger-api.json and job-scheduler.json into this folder instead of printing.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// With --out-dir: fail if the files there differ instead of writing them.
    #[arg(long, requires = "out_dir")]
    check: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let line = format!("{error:#}").split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("herald: {line}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Making a key needs no configuration: it is how a first one is made.
    if let Command::Key(KeyCommand::New(args)) = &cli.command {
        new_key(args);
        return Ok(());
    }
    let (mut settings, sources) = Settings::load_traced(&cli.global.config_dir, &cli.global.env, std::env::vars())?;
    let quiet = matches!(
        cli.command,
        Command::Seed(_) | Command::Openapi(_) | Command::Config(_) | Command::Doctor | Command::Key(_)
    );
    let filter = if quiet {
        "warn".to_owned()
    } else {
        settings.telemetry.filter.clone()
    };
    telemetry::init(settings.telemetry.format, &filter);
    if matches!(cli.command, Command::MessengerApi | Command::JobScheduler) {
        for warning in settings.key_warnings() {
            tracing::warn!("{warning}");
        }
    }
    match cli.command {
        Command::MessengerApi => {
            let app = herald_messenger_api::Application::build(&settings).await?;
            app.run_until_stopped(shutdown::wait_for_signal()).await?;
        }
        Command::JobScheduler => {
            let app = herald_job_scheduler::Application::build(&settings).await?;
            app.run_until_stopped(shutdown::wait_for_signal()).await?;
        }
        Command::WebhookSink(args) => {
            let sink_settings = &mut settings.webhook_sink;
            sink_settings.latency_ms = args.latency_ms.unwrap_or(sink_settings.latency_ms);
            sink_settings.fail_rate = args.fail_rate.unwrap_or(sink_settings.fail_rate);
            sink_settings.status = args.status.unwrap_or(sink_settings.status);
            sink_settings.port = args.port.unwrap_or(sink_settings.port);
            settings.validate()?;
            let s = &settings.webhook_sink;
            let sink = herald_webhook_sink::WebhookSink::build(herald_webhook_sink::SinkConfig {
                format: args.format,
                auth_user: args.auth_user.clone(),
                host: s.host.clone(),
                port: s.port,
                auth_header: settings.webhook.auth_header.clone(),
                auth_key: args.auth_key.clone().map_or_else(
                    || settings.webhook.auth_key.clone(),
                    herald_core::settings::SecretString::from,
                ),
                latency: std::time::Duration::from_millis(s.latency_ms),
                fail_rate: s.fail_rate,
                fail_status: s.status,
                receipts: args
                    .receipts_url
                    .clone()
                    .map(|url| herald_webhook_sink::receipts::ReceiptPlan {
                        url,
                        secret: args.receipts_secret.clone().into(),
                        delay: std::time::Duration::from_millis(args.receipts_delay_ms),
                        undelivered: args.receipts_undelivered,
                        duplicate: args.receipts_duplicate,
                        out_of_order: args.receipts_out_of_order,
                        before_answer: args.receipts_before_answer,
                        give_up_after: std::time::Duration::from_secs(args.receipts_give_up_seconds),
                    }),
                callback_keys: if args.callback_secret.is_empty() {
                    settings.callbacks.signing_keys()?
                } else {
                    herald_core::callbacks::SigningKeys::parse(
                        &args.callback_secret.iter().cloned().map(Into::into).collect::<Vec<_>>(),
                    )?
                },
            })
            .await?;
            sink.run_until_stopped(shutdown::wait_for_signal()).await?;
        }
        Command::Seed(args) => seed::run(&settings, args.count).await?,
        Command::Openapi(args) => openapi(&settings, args).await?,
        Command::Config(ConfigCommand::Check) => print_config(&cli.global.env, &sources, &settings),
        Command::Doctor => doctor(&settings, &cli.global.env).await?,
        Command::Key(KeyCommand::New(args)) => new_key(&args),
    }
    Ok(())
}

/// `herald doctor`: one line per check; an error (exit 1) when one failed.
async fn doctor(settings: &Settings, env: &str) -> anyhow::Result<()> {
    use herald_core::doctor::{examine, Level};
    println!("# herald doctor, environment {env:?}");
    let findings = examine(settings, env, &herald_messenger_api::store::index_specs()).await;
    for f in &findings {
        println!("[{}] {:<14} {}", f.level.tag(), f.subject, f.detail);
    }
    let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warned = findings.iter().filter(|f| f.level == Level::Warn).count();
    println!(
        "# {failed} failed, {warned} warnings, {} ok",
        findings.len() - failed - warned
    );
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// `herald config check` on a configuration that loaded and validated.
fn print_config(env: &str, sources: &[herald_core::settings::Source], settings: &Settings) {
    println!("# herald configuration for environment {env:?}: valid");
    println!("# layers, each overriding the ones before:");
    for source in sources {
        println!("#   {source}");
    }
    print!("{}", settings.to_redacted_toml());
}

async fn openapi(settings: &Settings, args: OpenapiArgs) -> anyhow::Result<()> {
    let documents = [
        (
            "messenger-api.json",
            herald_messenger_api::openapi_json(settings).await?,
        ),
        (
            "job-scheduler.json",
            herald_job_scheduler::openapi_json(settings).await?,
        ),
    ];
    let Some(dir) = args.out_dir else {
        for (_, document) in documents {
            println!("{document}");
        }
        return Ok(());
    };
    for (name, document) in documents {
        let path = dir.join(name);
        let document = format!("{document}\n");
        if args.check {
            let current =
                std::fs::read_to_string(&path).with_context(|| format!("Failed to read {}", path.display()))?;
            anyhow::ensure!(
                current == document,
                "{} is stale: run `herald openapi --out-dir {}`",
                path.display(),
                dir.display()
            );
        } else {
            std::fs::create_dir_all(&dir).with_context(|| format!("Failed to create {}", dir.display()))?;
            std::fs::write(&path, document).with_context(|| format!("Failed to write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
