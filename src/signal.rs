//! The shutdown signal: SIGTERM (Kubernetes) or SIGINT (a terminal), whichever comes first.

/// Completes when the process is asked to stop.
pub async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; draining"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
