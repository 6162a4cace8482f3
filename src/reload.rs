//! Hot reload of policies: on a file change (notify) or SIGHUP, parse and validate the directory,
//! then swap it in atomically; an invalid directory is refused and the last good policies stay.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::policy::PolicySet;

/// Loads the directory and swaps it in when valid. Returns whether it was swapped.
pub fn reload(dir: &Path, policies: &ArcSwap<PolicySet>, metrics: &Metrics, has_ca: bool) -> bool {
    let loaded = PolicySet::load_dir_or_builtin(dir);
    // The same refusal as at start-up: a policy asking for inspection the server cannot give.
    if let Ok(set) = &loaded
        && let Err(e) = crate::inspect::check_served(set, has_ca)
    {
        metrics.policy_reload_errors.inc();
        tracing::error!(target: "sluice::policy", errors = %e, "policy reload refused; the last good policies stay in force");
        return false;
    }
    match loaded {
        Ok(set) => {
            for w in &set.warnings {
                tracing::warn!(target: "sluice::policy", "{w}");
            }
            let names: Vec<&str> = set.names().collect();
            let generation = metrics.policy_generation.inc() + 1;
            tracing::info!(target: "sluice::policy", generation, policies = %names.join(","), "policies reloaded");
            policies.store(Arc::new(set));
            true
        }
        Err(errors) => {
            metrics.policy_reload_errors.inc();
            tracing::error!(target: "sluice::policy", errors = %errors, "policy reload refused; the last good policies stay in force");
            false
        }
    }
}

/// Listens for SIGHUP and (when `watch`) watches `dir`; each burst of changes triggers one reload.
pub fn spawn(
    dir: PathBuf,
    watch: bool,
    policies: Arc<ArcSwap<PolicySet>>,
    metrics: Arc<Metrics>,
    has_ca: bool,
    stop: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let watch_tx = tx.clone();
    // The watcher lives as long as the task below; dropping it stops the watch.
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = watch_tx.try_send(());
        }
    });
    let watcher = match watcher.ok().filter(|_| watch).ok_or("watching is off ([policies] watch = false)") {
        Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "not watching the policy directory; SIGHUP still reloads");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "no file watcher; SIGHUP still reloads");
            None
        }
    };
    tokio::spawn(async move {
        let _watcher = watcher;
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP");
            return;
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                Some(()) = rx.recv() => {}
                _ = hup.recv() => tracing::info!(target: "sluice::policy", "SIGHUP: reloading policies"),
            }
            // Editors write files in several steps: wait for the burst to settle, then load once.
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            reload(&dir, &policies, &metrics, has_ca);
        }
    });
    drop(tx);
}
