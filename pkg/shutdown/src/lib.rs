//! Graceful shutdown: SIGINT and SIGTERM become one [`CancellationToken`].
//!
//! Every long-running task of a service holds a clone of the token and stops taking new work
//! once it is cancelled; servers use [`CancellationToken::cancelled_owned`] as their shutdown
//! signal.

#![forbid(unsafe_code)]

pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

/// Returns a token that is cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
pub fn token_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        child.cancel();
    });
    token
}

/// Completes when the process receives SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
