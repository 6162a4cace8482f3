//! `sluice serve`: load configuration and policies, bind the listeners, run until SIGTERM/SIGINT,
//! then drain.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::admin::Admin;
use crate::audit::AuditLog;
use crate::config::{Config, LogFormat, StoreKind};
use crate::credential::{KEY_ENV, Keyring};
use crate::git::GitProxy;
use crate::limit::redis::RedisLimiter;
use crate::limit::{Limiter, MemoryLimiter};
use crate::listen::Shutdown;
use crate::metrics::{Denials, Metrics};
use crate::net::Resolver;
use crate::policy::PolicySet;
use crate::proxy::{self, EgressProxy};

/// A server that has bound its listeners and is ready to run.
pub struct Server {
    pub egress: Arc<EgressProxy>,
    egress_listener: crate::listen::Spread,
    git_listener: TcpListener,
    git: Arc<GitProxy>,
    admin_listener: TcpListener,
    /// The shared limit store, when `[limits.store] kind = "redis"`.
    store: Option<Arc<RedisLimiter>>,
    config: Config,
}

impl Server {
    /// Checks everything a running proxy would trip over later, and binds the listeners.
    pub async fn bind(config: Config, audit: AuditLog) -> Result<Server, String> {
        let policies = PolicySet::load_dir_or_builtin(&config.policies.dir).map_err(|d| d.to_string())?;
        for w in &policies.warnings {
            tracing::warn!(target: "sluice::policy", "{w}");
        }
        if policies.get(&config.egress.policy).is_none() {
            let known: Vec<&str> = policies.names().collect();
            return Err(format!(
                "[egress] policy = {:?} names no policy; known: {}",
                config.egress.policy,
                known.join(", ")
            ));
        }
        // A policy that asks for inspection is refused at start-up when it cannot be served; the CA is
        // loaded (and checked) whenever one is configured.
        crate::inspect::check_served(&policies, config.inspect.has_ca())?;
        let inspector = crate::inspect::Inspector::load(&config.inspect)?;
        let terminator = match &inspector.leaves {
            Some(leaves) => Some(Arc::new(proxy::inspected::Terminator::new(leaves.clone(), &inspector.extra_roots)?)),
            None => None,
        };
        let keys = Keyring::load(config.auth.key_file.as_deref(), config.auth.previous_key_file.as_deref())
            .map_err(|e| format!("[auth]: {e}"))?;
        if keys.is_none() && !config.auth.anonymous {
            return Err(format!("[auth] anonymous = false needs a signing key: set [auth] key_file or {KEY_ENV}"));
        }
        let resolver = Resolver::new(&config.resolver)?;
        let egress_listener = crate::listen::bind_spread(config.egress.listen, config.server.accept_threads())
            .await
            .map_err(|e| format!("cannot listen on {} ([egress] listen): {e}", config.egress.listen))?;
        let git_listener = TcpListener::bind(config.git.listen)
            .await
            .map_err(|e| format!("cannot listen on {} ([git] listen): {e}", config.git.listen))?;
        let admin_listener = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|e| format!("cannot listen on {} ([admin] listen): {e}", config.admin.listen))?;
        let own: Vec<SocketAddr> = [Ok(egress_listener.addr), git_listener.local_addr(), admin_listener.local_addr()]
            .into_iter()
            .flatten()
            .collect();
        let metrics = Arc::new(Metrics::default());
        let denials = Arc::new(Denials::default());
        let (limiter, store): (Arc<dyn Limiter>, _) = match config.limits.store.kind {
            StoreKind::Memory => {
                metrics.limit_store_up.set(1);
                (Arc::new(MemoryLimiter::new(config.limits.clone())), None)
            }
            StoreKind::Redis => {
                let store = Arc::new(RedisLimiter::start(config.limits.clone(), metrics.clone()).await?);
                (store.clone(), Some(store))
            }
        };
        let dialer = crate::git::upstream::Dialer {
            resolver: Arc::new(Resolver::new(&config.resolver)?),
            own: Arc::from(own.clone()),
            metrics: metrics.clone(),
            connect_timeout: config.egress.connect_timeout.0,
        };
        let git = GitProxy::with_dialer(&config.git, keys.clone(), dialer)?.with_audit(audit.clone()).sharing(
            limiter.clone(),
            metrics.clone(),
            denials.clone(),
        );
        let git = Arc::new(git);
        let egress = Arc::new(EgressProxy {
            config: config.egress.clone(),
            policies: Arc::new(ArcSwap::from_pointee(policies)),
            resolver,
            keys,
            anonymous: config.auth.anonymous,
            own,
            shutdown: Shutdown::default(),
            metrics,
            denials,
            limiter,
            audit: audit.clone(),
            terminator,
        });
        egress.metrics.policy_generation.set(1);
        Ok(Server { egress, egress_listener, git_listener, git, admin_listener, store, config })
    }

    pub fn egress_addr(&self) -> Option<SocketAddr> {
        Some(self.egress_listener.addr)
    }

    pub fn git_addr(&self) -> Option<SocketAddr> {
        self.git_listener.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener.local_addr().ok()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets open tunnels and requests
    /// finish within `[server] shutdown_grace`, and closes what is left. `Err` when it stopped on its
    /// own instead: the egress listener's accept threads could not run.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), String> {
        let egress = self.egress.clone();
        // Aborted with this future if it is dropped rather than run to its end: the egress proxy's accept
        // threads go with their task (see `listen::serve_threads`), instead of serving on unowned.
        let mut accept = AbortOnDropHandle::new(tokio::spawn(proxy::serve(self.egress_listener, egress.clone())));
        // Both proxies drain and stop together.
        let git = AbortOnDropHandle::new(tokio::spawn(crate::git::serve(
            self.git_listener,
            self.git,
            egress.shutdown.clone(),
        )));
        let admin = Arc::new(Admin {
            metrics: egress.metrics.clone(),
            denials: egress.denials.clone(),
            dropped_lines: Box::new({
                let audit = egress.audit.clone();
                move || audit.dropped()
            }),
            store: self.store.clone(),
            draining: egress.shutdown.draining.clone(),
        });
        // The admin listener stays up while the proxies drain, so health checks see the drain.
        let admin_shutdown = Shutdown::default();
        tokio::spawn(crate::admin::serve(self.admin_listener, admin, admin_shutdown.clone()));
        let limiter = egress.limiter.clone();
        let housekeeping_stop = admin_shutdown.draining.clone();
        tokio::spawn(async move {
            // Idle sessions' limiter state and counters are dropped so memory stays bounded.
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = tick.tick() => limiter.housekeeping(),
                    () = housekeeping_stop.cancelled() => return,
                }
            }
        });
        if self.config.policies.dir.is_dir() {
            crate::reload::spawn(
                self.config.policies.dir.clone(),
                self.config.policies.watch,
                egress.policies.clone(),
                egress.metrics.clone(),
                self.config.inspect.has_ca(),
                admin_shutdown.draining.clone(),
            );
        }
        // The egress accept loops end only when drained; before that, only if no accept thread could run
        // (each one's failure is logged as it happens): a proxy that accepts nothing is stopped.
        let outcome = tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            _ = &mut accept => Err("no egress accept thread could run (see the lines above); stopping".to_string()),
        };
        let grace = self.config.server.shutdown_grace.0;
        tracing::info!(grace_secs = grace.as_secs(), "shutting down: no new connections; draining");
        let drained = egress.shutdown.drain(grace).await;
        // (A finished task is not polled again: its output may already be taken.)
        if !accept.is_finished() {
            let _ = accept.await;
        }
        let _ = git.await;
        if !drained {
            tracing::warn!("shutdown grace over: closed the connections still open");
        }
        admin_shutdown.drain(std::time::Duration::ZERO).await;
        tracing::info!("stopped");
        outcome
    }
}

/// Starts the log writer (`[log] file`, else stderr) and routes diagnostics (`tracing`) through it,
/// in the same format as the audit lines. The returned log is what [`Server::bind`] writes to.
pub fn init_logging(config: &Config) -> Result<AuditLog, String> {
    use tracing_subscriber::EnvFilter;
    let out: Box<dyn std::io::Write + Send> = match &config.log.file {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open [log] file {}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stderr()),
    };
    let audit = AuditLog::start(config.log.format, out);
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(audit.clone()).with_ansi(false);
    let result = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(audit)
}

/// Cancels the token on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers; stop sluice with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        t.cancel();
    });
    token
}
