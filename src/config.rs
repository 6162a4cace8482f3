//! The server configuration (`sluice.toml`): every key optional, unknown keys refused with their location.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::diagnostic::{Diagnostics, Source, from_toml_error};
use crate::policy::quota::{ByteQuota, ByteSize, MIN_BYTES_PER_SECOND};

/// A duration written as `30s`, `15m`, `8h`, `7d`, or a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Seconds(Duration::from_secs(n))),
            Raw::Text(t) => {
                parse_duration(&t).map(|s| Seconds(Duration::from_secs(s))).map_err(serde::de::Error::custom)
            }
        }
    }
}

/// Parses `30s`, `15m`, `8h`, `7d` (or plain seconds) into seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration {text:?}: expected e.g. 30s, 15m, 8h or 7d");
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    pub listen: SocketAddr,
    /// The policy for clients without credentials (when anonymous use is allowed).
    pub policy: String,
    pub connect_timeout: Seconds,
    /// A tunnel with no bytes either way for this long is closed.
    pub idle_timeout: Seconds,
    /// Slowloris guard: the whole request head must arrive within this.
    pub header_timeout: Seconds,
    pub max_header_bytes: usize,
    /// Open client connections beyond this are answered `503` and closed.
    pub max_connections: usize,
    /// On tunnels that are not terminated, refuse a ClientHello whose server name is not the CONNECT
    /// host (`sni_mismatch`).
    pub check_sni: bool,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 3128)),
            policy: "trusted".into(),
            connect_timeout: Seconds(Duration::from_secs(10)),
            idle_timeout: Seconds(Duration::from_secs(600)),
            header_timeout: Seconds(Duration::from_secs(10)),
            max_header_bytes: 32 * 1024,
            max_connections: 10_000,
            check_sni: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub key_file: Option<PathBuf>,
    pub previous_key_file: Option<PathBuf>,
    /// Whether clients without credentials are served (with `[egress] policy`).
    pub anonymous: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { key_file: None, previous_key_file: None, anonymous: true }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoliciesConfig {
    pub dir: PathBuf,
    /// Reload when a file in `dir` changes (SIGHUP always reloads).
    pub watch: bool,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        PoliciesConfig { dir: PathBuf::from("policies"), watch: true }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// Static answers consulted before DNS.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Whether names missing from `hosts` are looked up in DNS (`/etc/hosts`, `resolv.conf`).
    pub system: bool,
    pub timeout: Seconds,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig { hosts: BTreeMap::new(), system: true, timeout: Seconds(Duration::from_secs(5)) }
    }
}

/// The server's limits for sessions whose policy sets none: the `[limits]` table of the server configuration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "RawLimitDefaults")]
pub struct LimitDefaults {
    /// New CONNECT tunnels plus plain-HTTP requests per second, per session.
    pub requests_per_second: f64,
    /// Requests a session may make at once before the rate applies.
    pub burst: u32,
    /// Concurrent open tunnels per session.
    pub max_tunnels: u32,
    /// Shaping per session, each direction: none by default (unlimited sessions keep the zero-copy path).
    pub upload_bytes_per_second: Option<ByteSize>,
    pub download_bytes_per_second: Option<ByteSize>,
    /// Bytes per session per fixed window, each direction: none by default.
    pub upload_quota: Option<ByteQuota>,
    pub download_quota: Option<ByteQuota>,
    /// Where the counts live: `[limits.store]`.
    pub store: StoreConfig,
}

impl Default for LimitDefaults {
    fn default() -> Self {
        LimitDefaults {
            requests_per_second: 20.0,
            burst: 40,
            max_tunnels: 128,
            upload_bytes_per_second: None,
            download_bytes_per_second: None,
            upload_quota: None,
            download_quota: None,
            store: StoreConfig::default(),
        }
    }
}

/// The table as written; [`LimitDefaults`] is built from it only when every value is usable.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimitDefaults {
    requests_per_second: f64,
    burst: u32,
    max_tunnels: u32,
    #[serde(deserialize_with = "bytes_per_second")]
    upload_bytes_per_second: Option<ByteSize>,
    #[serde(deserialize_with = "bytes_per_second")]
    download_bytes_per_second: Option<ByteSize>,
    upload_quota: Option<ByteQuota>,
    download_quota: Option<ByteQuota>,
    store: StoreConfig,
}

impl Default for RawLimitDefaults {
    fn default() -> Self {
        let d = LimitDefaults::default();
        RawLimitDefaults {
            requests_per_second: d.requests_per_second,
            burst: d.burst,
            max_tunnels: d.max_tunnels,
            upload_bytes_per_second: None,
            download_bytes_per_second: None,
            upload_quota: None,
            download_quota: None,
            store: d.store,
        }
    }
}

/// A shaping rate, refused where it is written when it is too slow to be one.
fn bytes_per_second<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
    let rate = ByteSize::deserialize(d)?;
    if rate < MIN_BYTES_PER_SECOND {
        return Err(serde::de::Error::custom(format!(
            "a shaping rate must be at least {MIN_BYTES_PER_SECOND} per second, not {rate} (slower stalls every \
             tunnel; e.g. \"10MiB\")"
        )));
    }
    Ok(Some(rate))
}

impl TryFrom<RawLimitDefaults> for LimitDefaults {
    type Error = String;

    fn try_from(raw: RawLimitDefaults) -> Result<Self, String> {
        let rps = raw.requests_per_second;
        if !(rps.is_finite() && rps > 0.0) {
            return Err(format!("requests_per_second must be a positive number, not {rps} (e.g. 20)"));
        }
        if raw.burst == 0 {
            return Err("burst must be at least 1, not 0 (e.g. 40)".into());
        }
        if raw.max_tunnels == 0 {
            return Err("max_tunnels must be at least 1, not 0 (e.g. 128)".into());
        }
        Ok(LimitDefaults {
            requests_per_second: rps,
            burst: raw.burst,
            max_tunnels: raw.max_tunnels,
            upload_bytes_per_second: raw.upload_bytes_per_second,
            download_bytes_per_second: raw.download_bytes_per_second,
            upload_quota: raw.upload_quota,
            download_quota: raw.download_quota,
            store: raw.store,
        })
    }
}

/// A duration with a unit, down to milliseconds: `20ms`, `2s`, `1m`. A bare number is refused, since
/// elsewhere in this file it means seconds and here that would be a thousandfold mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Millis(pub Duration);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => {
                Err(serde::de::Error::custom(format!("duration {n} has no unit: write e.g. \"{n}ms\" or \"{n}s\"")))
            }
            Raw::Text(t) => parse_millis(&t).map(Millis).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `20ms`, `2s`, `1m`.
pub fn parse_millis(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: expected e.g. 20ms, 2s or 1m");
    let i = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = text.split_at(i);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        _ => None,
    };
    ms.map(Duration::from_millis).ok_or_else(bad)
}

/// Which store holds the limits' counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// This process only: limits are per instance.
    #[default]
    Memory,
    /// A Redis server shared by every instance: limits hold however traffic is spread.
    Redis,
}

/// What a request that needs the shared store gets while the store is unreachable or slow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Per-instance limits meanwhile (logged, counted); the store is retried in the background.
    #[default]
    Local,
    /// `503 limit_store_unavailable`.
    Refuse,
}

/// `[limits.store]`: where per-session counts live.
///
/// ```toml
/// [limits.store]
/// kind = "redis"                  # default "memory"
/// url = "redis://127.0.0.1:6379/0"
/// on_error = "local"              # or "refuse"
/// timeout = "20ms"                # the most any check waits on the store
/// lease_ttl = "30s"               # a crashed instance's tunnels stop counting after this
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawStoreConfig")]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `redis://[user:password@]host:port/db` or `redis+unix:///path`; required for `kind = "redis"`.
    pub url: Option<String>,
    pub on_error: OnStoreError,
    /// The deadline of every call to the store, so that the egress path never waits longer.
    pub timeout: Duration,
    /// How long an open tunnel's lease lasts unless its instance refreshes it (every third of it).
    pub lease_ttl: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            url: None,
            on_error: OnStoreError::Local,
            timeout: Duration::from_millis(20),
            lease_ttl: Duration::from_secs(30),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStoreConfig {
    #[serde(default)]
    kind: StoreKind,
    url: Option<String>,
    #[serde(default)]
    on_error: OnStoreError,
    timeout: Option<Millis>,
    lease_ttl: Option<Millis>,
}

impl TryFrom<RawStoreConfig> for StoreConfig {
    type Error = String;

    fn try_from(raw: RawStoreConfig) -> Result<Self, String> {
        let d = StoreConfig::default();
        let timeout = raw.timeout.map_or(d.timeout, |m| m.0);
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&timeout) {
            return Err(format!("timeout must be between 1ms and 10s, not {timeout:?} (default 20ms)"));
        }
        let lease_ttl = raw.lease_ttl.map_or(d.lease_ttl, |m| m.0);
        if !(Duration::from_millis(500)..=Duration::from_secs(3600)).contains(&lease_ttl) {
            return Err(format!("lease_ttl must be between 500ms and 1h, not {lease_ttl:?} (default 30s)"));
        }
        match (raw.kind, &raw.url) {
            (StoreKind::Redis, None) => {
                return Err("kind = \"redis\" needs a url, e.g. url = \"redis://127.0.0.1:6379/0\"".into());
            }
            (StoreKind::Memory, Some(url)) => {
                return Err(format!("url {url:?} is only read with kind = \"redis\" (the default kind is \"memory\")"));
            }
            (StoreKind::Redis, Some(url)) => {
                if let Err(e) = redis::Client::open(url.as_str()) {
                    return Err(format!(
                        "invalid url {:?}: {e} (expected redis://host:port/db or redis+unix:///path)",
                        redact_url(url)
                    ));
                }
            }
            (StoreKind::Memory, None) => {}
        }
        Ok(StoreConfig { kind: raw.kind, url: raw.url, on_error: raw.on_error, timeout, lease_ttl })
    }
}

/// `url` without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &userinfo[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/metrics`, `/healthz`, `/v1/denials`.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], 3130)) }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Append to this file instead of stderr.
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub shutdown_grace: Seconds,
    /// Threads: the egress listener's accept threads (each runs the connections it accepts, on a
    /// current-thread runtime of its own; see `listen::serve_threads`) and the workers of the runtime
    /// that serves the git and admin listeners. 0 means one per CPU.
    pub threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { shutdown_grace: Seconds(Duration::from_secs(30)), threads: 0 }
    }
}

impl ServerConfig {
    /// How many threads accept and run the egress proxy's connections: `threads`, else one per CPU.
    pub fn accept_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// The `[git]` table of `sluice.toml`.
///
/// ```toml
/// [git]
/// listen = "127.0.0.1:3129"
/// upstream = "https://github.com"
/// api_upstream = "https://api.github.com"
/// token_env = "SLUICE_GITHUB_TOKEN"      # the default token; token_file wins when both are set
/// # token_file = "/etc/sluice/github-token"
/// [git.tokens]                            # per owner or repository; OWNER/REPO wins over OWNER
/// "acme" = { file = "/etc/sluice/acme-token" }
/// "acme/widgets" = { env = "WIDGETS_TOKEN" }
/// ```
/// and for the `/api/` slice `comment_scope = "own-pull" | "repository"`, `log_hosts = [...]`,
/// `log_allow_ips = [...]` and `[git.limits] api_writes_per_minute = 30`.
/// Token values never appear in the config itself, only where to read them from.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitSettings {
    pub listen: SocketAddr,
    pub upstream: String,
    /// The GitHub REST API the `/api/` routes forward to.
    pub api_upstream: String,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    pub tokens: BTreeMap<String, TokenSource>,
    /// Client connections served at once; more are answered `503` and closed.
    pub max_connections: usize,
    /// How long a client may pause while sending a request body (a push's command list, or any upload
    /// streaming upstream) before the request fails.
    pub body_timeout: Seconds,
    /// Where the `/api/` slice lets a session comment with `POST …/issues/N/comments`.
    pub comment_scope: CommentScope,
    /// The storage hosts a job or run log redirect may be followed to (host patterns, optional `:port`).
    pub log_hosts: Vec<LogHost>,
    /// Address ranges the address guard lets log storage dials reach (private ranges included).
    pub log_allow_ips: Vec<IpRange>,
    pub limits: GitLimits,
}

/// `[git] comment_scope`: `"own-pull"` (the default) comments only on the session's own pull requests;
/// `"repository"` also on the repository's issues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommentScope {
    #[default]
    OwnPull,
    Repository,
}

/// The hosts GitHub documents for Actions logs: a job or run log answers with a redirect to signed
/// storage on one of these.
pub const DEFAULT_LOG_HOSTS: [&str; 4] = [
    "results-receiver.actions.githubusercontent.com",
    "*.actions.githubusercontent.com",
    "productionresultssa*.blob.core.windows.net",
    "pipelines.actions.githubusercontent.com",
];

/// One `[git] log_hosts` entry: a host pattern as in a policy's `allow`, with an optional `:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogHost(pub crate::policy::HostPattern);

impl<'de> Deserialize<'de> for LogHost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::policy::HostPattern::parse(&text).map(LogHost).map_err(|e| {
            let hint = e.hint().map(|h| format!("; {h}")).unwrap_or_default();
            serde::de::Error::custom(format!("invalid log host {text:?}: {e}{hint}"))
        })
    }
}

/// An address or CIDR range (`10.0.0.0/8`, `127.0.0.1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange(pub ipnet::IpNet);

impl<'de> Deserialize<'de> for IpRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Ok(net) = text.parse::<ipnet::IpNet>() {
            return Ok(IpRange(net));
        }
        text.parse::<IpAddr>().map(|ip| IpRange(ip.into())).map_err(|_| {
            serde::de::Error::custom(format!("invalid address range {text:?}: expected e.g. 10.0.0.0/8 or 127.0.0.1"))
        })
    }
}

/// `[git.limits]`: per session, from the git credential's session id; another session is unaffected.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "RawGitLimits")]
pub struct GitLimits {
    /// Smart-HTTP and `/api` requests per second.
    pub requests_per_second: f64,
    /// Requests a session may make at once before the rate applies.
    pub burst: u32,
    /// Client connections one session may hold open at once (a connection counts for the session of its
    /// first authenticated request until it closes).
    pub max_connections: u32,
    /// API writes (pull requests, edits, comments, replies) a session may make per minute; more are
    /// answered `429` with `Retry-After`.
    pub api_writes_per_minute: u32,
}

impl Default for GitLimits {
    fn default() -> Self {
        GitLimits { requests_per_second: 10.0, burst: 60, max_connections: 16, api_writes_per_minute: 30 }
    }
}

/// The table as written; [`GitLimits`] is built from it only when every value is usable, so a bad value
/// is reported at its place in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawGitLimits {
    requests_per_second: f64,
    burst: u32,
    max_connections: u32,
    api_writes_per_minute: u32,
}

impl Default for RawGitLimits {
    fn default() -> Self {
        let d = GitLimits::default();
        RawGitLimits {
            requests_per_second: d.requests_per_second,
            burst: d.burst,
            max_connections: d.max_connections,
            api_writes_per_minute: d.api_writes_per_minute,
        }
    }
}

impl TryFrom<RawGitLimits> for GitLimits {
    type Error = String;

    fn try_from(raw: RawGitLimits) -> Result<Self, String> {
        let d = GitLimits::default();
        let rps = raw.requests_per_second;
        if !(rps.is_finite() && rps > 0.0) {
            return Err(format!(
                "requests_per_second must be a positive number, not {rps} (e.g. {})",
                d.requests_per_second
            ));
        }
        for (key, value, example) in
            [("burst", raw.burst, d.burst), ("max_connections", raw.max_connections, d.max_connections)]
        {
            if value == 0 {
                return Err(format!("{key} must be at least 1, not 0 (e.g. {example})"));
            }
        }
        Ok(GitLimits {
            requests_per_second: rps,
            burst: raw.burst,
            max_connections: raw.max_connections,
            api_writes_per_minute: raw.api_writes_per_minute,
        })
    }
}

impl Default for GitSettings {
    fn default() -> Self {
        GitSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 3129)),
            upstream: "https://github.com".into(),
            api_upstream: "https://api.github.com".into(),
            token_env: Some("SLUICE_GITHUB_TOKEN".into()),
            token_file: None,
            tokens: BTreeMap::new(),
            max_connections: 1024,
            body_timeout: Seconds(Duration::from_secs(30)),
            comment_scope: CommentScope::OwnPull,
            log_hosts: DEFAULT_LOG_HOSTS
                .iter()
                .filter_map(|h| crate::policy::HostPattern::parse(h).ok().map(LogHost))
                .collect(),
            log_allow_ips: Vec::new(),
            limits: GitLimits::default(),
        }
    }
}

/// Where one real token is read from: `{ file = "/path" }` or `{ env = "VAR" }`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum TokenSource {
    File(PathBuf),
    Env(String),
}

/// The `[inspect]` table: the CA that signs leaf certificates for inspected tunnels, and the roots the
/// upstream leg trusts beyond the web PKI.
///
/// ```toml
/// [inspect]
/// ca_cert = "/etc/sluice/ca.pem"      # written by `sluice ca init --dir /etc/sluice`
/// ca_key = "/etc/sluice/ca.key"
/// extra_roots = ["/etc/sluice/corp-root.pem"]
/// leaf_cache = 10000
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InspectConfig {
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// PEM files whose certificates the upstream leg trusts besides the web PKI.
    pub extra_roots: Vec<PathBuf>,
    /// Leaf certificates kept (least recently used evicted first).
    pub leaf_cache: usize,
}

impl Default for InspectConfig {
    fn default() -> Self {
        InspectConfig { ca_cert: None, ca_key: None, extra_roots: Vec::new(), leaf_cache: 10_000 }
    }
}

impl InspectConfig {
    /// Whether a CA is configured (both files named; [`Config::parse`] refuses one without the other).
    pub fn has_ca(&self) -> bool {
        self.ca_cert.is_some() && self.ca_key.is_some()
    }
}

/// Everything `sluice serve` reads; `Config::default()` is the out-of-the-box local mode.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub egress: EgressConfig,
    pub auth: AuthConfig,
    pub policies: PoliciesConfig,
    pub resolver: ResolverConfig,
    /// Per-session limits for policies that set none.
    pub limits: LimitDefaults,
    pub git: GitSettings,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub server: ServerConfig,
    pub inspect: InspectConfig,
}

impl Config {
    /// Parses a configuration file's text; `name` is used in error locations.
    pub fn parse(name: &str, text: &str) -> Result<Config, Diagnostics> {
        let src = Source::new(name, text);
        let config: Config = toml::from_str(text).map_err(|e| Diagnostics(vec![from_toml_error(&src, &e)]))?;
        let mut errors = Vec::new();
        for (host, addrs) in &config.resolver.hosts {
            if let Err(e) = crate::policy::Host::parse(host) {
                let at = text.find(host.as_str()).unwrap_or(0);
                errors.push(src.error(
                    at..at + host.len(),
                    format!("invalid host {host:?} in [resolver] hosts: {e}"),
                    None,
                ));
            } else if addrs.is_empty() {
                let at = text.find(host.as_str()).unwrap_or(0);
                errors.push(src.error(
                    at..at + host.len(),
                    format!("{host:?} has no addresses in [resolver] hosts"),
                    Some("give at least one address, e.g. [\"127.0.0.1\"]".into()),
                ));
            }
        }
        if config.egress.max_header_bytes < 8192 {
            let at = text.find("max_header_bytes").unwrap_or(0);
            errors.push(src.error(at..at + 16, "max_header_bytes must be at least 8192", None));
        }
        if config.server.threads > 1024 {
            let at = text.find("threads").unwrap_or(0);
            let hint = Some("0 (the default) starts one per CPU".into());
            errors.push(src.error(at..at + 7, "threads must be at most 1024", hint));
        }
        let inspect = &config.inspect;
        for (given, missing) in [("ca_cert", "ca_key"), ("ca_key", "ca_cert")] {
            let has = |k| if k == "ca_cert" { inspect.ca_cert.is_some() } else { inspect.ca_key.is_some() };
            if has(given) && !has(missing) {
                let at = text.find(given).unwrap_or(0);
                let hint = Some(format!("set [inspect] {missing} too; `sluice ca init --dir DIR` writes both"));
                errors.push(src.error(at..at + given.len(), format!("[inspect] {given} needs {missing}"), hint));
            }
        }
        if inspect.leaf_cache == 0 {
            let at = text.find("leaf_cache").unwrap_or(0);
            let hint = Some("the default is 10000".into());
            errors.push(src.error(at..at + 10, "leaf_cache must be at least 1", hint));
        }
        if errors.is_empty() { Ok(config) } else { Err(Diagnostics(errors)) }
    }

    pub fn load(path: &Path) -> Result<Config, Diagnostics> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Diagnostics(vec![crate::diagnostic::Diagnostic::file_error(&name, format!("cannot read: {e}"))])
        })?;
        Config::parse(&name, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_local_mode() {
        let c = Config::parse("s.toml", "").unwrap();
        assert_eq!(c.egress.listen, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(c.egress.policy, "trusted");
        assert!(c.auth.anonymous);
        assert_eq!(c.server.shutdown_grace, Seconds(Duration::from_secs(30)));
        assert_eq!(c.server.threads, 0);
        let e = Config::parse("s.toml", "[server]\nthreads = 5000\n").unwrap_err().to_string();
        assert!(e.contains("s.toml:2:1") && e.contains("threads must be at most 1024"), "{e}");
    }

    #[test]
    fn documented_keys_parse() {
        let text = r#"
[egress]
listen = "127.0.0.1:0"
policy = "full"
idle_timeout = "5m"
[auth]
anonymous = false
[policies]
dir = "p"
[resolver]
hosts = { "bench.test" = ["127.0.0.1"] }
[log]
format = "text"
[server]
shutdown_grace = "2s"
"#;
        let c = Config::parse("s.toml", text).unwrap();
        assert_eq!(c.egress.idle_timeout, Seconds(Duration::from_secs(300)));
        assert_eq!(c.resolver.hosts["bench.test"], vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.log.format, LogFormat::Text);
        assert!(!c.auth.anonymous);
    }

    #[test]
    fn unknown_keys_point_at_their_location() {
        let err = Config::parse("s.toml", "[egress]\nlisten = \"127.0.0.1:3128\"\nlistn = 1\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("s.toml:3:1: error: unknown field `listn`, expected one of"), "{text}");
        let err = Config::parse("s.toml", "[server]\nshutdown_grace = \"3 weeks\"\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("s.toml:2:18: error: invalid duration \"3 weeks\": expected e.g. 30s, 15m, 8h or 7d"),
            "{err}"
        );
    }

    #[test]
    fn inspect_table_parses_and_refuses_half_a_ca() {
        let c = Config::parse("s.toml", "").unwrap();
        assert_eq!(c.inspect, InspectConfig::default());
        assert_eq!(c.inspect.leaf_cache, 10_000);
        assert!(!c.inspect.has_ca());
        let text =
            "[inspect]\nca_cert = \"/ca.pem\"\nca_key = \"/ca.key\"\nextra_roots = [\"/r.pem\"]\nleaf_cache = 5\n";
        let c = Config::parse("s.toml", text).unwrap();
        assert!(c.inspect.has_ca());
        assert_eq!(c.inspect.extra_roots, vec![PathBuf::from("/r.pem")]);
        assert_eq!(c.inspect.leaf_cache, 5);
        let e = Config::parse("s.toml", "[inspect]\nca_cert = \"/ca.pem\"\n").unwrap_err().to_string();
        assert!(e.starts_with("s.toml:2:1: error: [inspect] ca_cert needs ca_key"), "{e}");
        assert!(e.contains("sluice ca init --dir DIR"), "{e}");
        let e = Config::parse("s.toml", "[inspect]\nleaf_cache = 0\n").unwrap_err().to_string();
        assert!(e.starts_with("s.toml:2:1: error: leaf_cache must be at least 1"), "{e}");
        let e = Config::parse("s.toml", "[inspect]\nca_certs = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `ca_certs`"), "{e}");
    }

    #[test]
    fn settings_parse_with_defaults_and_refuse_unknown_keys() {
        let s: GitSettings = toml::from_str("").unwrap();
        assert_eq!(s, GitSettings::default());
        let s: GitSettings = toml::from_str(
            "upstream = \"http://127.0.0.1:9\"\n[tokens]\n\"acme\" = { file = \"/t\" }\n\"acme/w\" = { env = \"W\" }\n",
        )
        .unwrap();
        assert_eq!(s.tokens["acme"], TokenSource::File("/t".into()));
        assert_eq!(s.tokens["acme/w"], TokenSource::Env("W".into()));
        let err = toml::from_str::<GitSettings>("listn = \"x\"").unwrap_err().to_string();
        assert!(err.contains("unknown field `listn`"), "{err}");
        let err = toml::from_str::<GitSettings>("[tokens]\nacme = \"ghp_x\"").unwrap_err().to_string();
        assert!(err.contains("acme"), "{err}");
    }

    #[test]
    fn the_api_slice_keys_parse_and_refuse_mistakes_at_their_location() {
        let d = GitSettings::default();
        assert_eq!(d.comment_scope, CommentScope::OwnPull);
        assert_eq!(d.log_hosts.len(), DEFAULT_LOG_HOSTS.len(), "every default log host is a valid pattern");
        assert_eq!((d.log_allow_ips.len(), d.limits.api_writes_per_minute), (0, 30));
        let c = Config::parse(
            "s.toml",
            "[git]\ncomment_scope = \"repository\"\nlog_hosts = [\"logs.test:8080\", \"*.blob.example.com\"]\n\
             log_allow_ips = [\"127.0.0.1\", \"10.0.0.0/8\"]\n[git.limits]\napi_writes_per_minute = 5\n",
        )
        .unwrap();
        assert_eq!(c.git.comment_scope, CommentScope::Repository);
        assert_eq!(c.git.log_hosts[0].0.port(), Some(8080));
        assert_eq!(
            c.git.log_allow_ips,
            vec![IpRange("127.0.0.1/32".parse().unwrap()), IpRange("10.0.0.0/8".parse().unwrap())]
        );
        assert_eq!(c.git.limits.api_writes_per_minute, 5);
        let err = |text: &str| Config::parse("s.toml", text).unwrap_err().to_string();
        let e = err("[git]\ncomment_scope = \"everywhere\"\n");
        assert!(
            e.starts_with("s.toml:2:17: error: unknown variant `everywhere`, expected `own-pull` or `repository`"),
            "{e}"
        );
        let e = err("[git]\nlog_hosts = [\"*.com\"]\n");
        assert!(e.starts_with("s.toml:2:13: error: invalid log host \"*.com\""), "{e}");
        let e = err("[git]\nlog_allow_ips = [\"localhost\"]\n");
        assert!(
            e.starts_with("s.toml:2:17: error: invalid address range \"localhost\": expected e.g. 10.0.0.0/8"),
            "{e}"
        );
        let e = err("[git.limits]\napi_writes = 3\n");
        assert!(
            e.starts_with(
                "s.toml:2:1: error: unknown field `api_writes`, expected one of `requests_per_second`, `burst`, \
                 `max_connections`, `api_writes_per_minute`"
            ),
            "{e}"
        );
    }

    #[test]
    fn limit_defaults_parse_with_defaults_and_refuse_mistakes() {
        let parse = |s: &str| toml::from_str::<LimitDefaults>(s).map_err(|e| e.to_string());
        assert_eq!(parse(""), Ok(LimitDefaults::default()));
        assert_eq!(
            parse("requests_per_second = 5.5\nmax_tunnels = 8"),
            Ok(LimitDefaults { requests_per_second: 5.5, burst: 40, max_tunnels: 8, ..LimitDefaults::default() })
        );
        let bytes = parse(
            "upload_bytes_per_second = \"10MiB\"\ndownload_bytes_per_second = \"100MiB\"\nupload_quota = \
             \"2GiB/hour\"\ndownload_quota = \"50GiB/day\"",
        );
        assert_eq!(
            bytes,
            Ok(LimitDefaults {
                upload_bytes_per_second: Some(ByteSize::bytes(10 << 20)),
                download_bytes_per_second: Some(ByteSize::bytes(100 << 20)),
                upload_quota: ByteQuota::parse("2GiB/hour").ok(),
                download_quota: ByteQuota::parse("50GiB/day").ok(),
                ..LimitDefaults::default()
            })
        );
        let err = |s: &str| parse(s).err().unwrap_or_default();
        assert!(err("bursts = 3").contains("unknown field `bursts`"), "{}", err("bursts = 3"));
        assert!(err("burst = 0").contains("burst must be at least 1, not 0"), "{}", err("burst = 0"));
        assert!(err("burst = -1").contains("invalid value: integer `-1`"), "{}", err("burst = -1"));
        assert!(
            err("requests_per_second = 0.0").contains("requests_per_second must be a positive number, not 0"),
            "{}",
            err("requests_per_second = 0.0")
        );
        assert!(err("max_tunnels = 0").contains("max_tunnels must be at least 1"), "{}", err("max_tunnels = 0"));
        for (written, expected) in [
            (
                "upload_quota = \"2GiB\"",
                "invalid quota \"2GiB\": expected SIZE/PERIOD (e.g. \"2GiB/hour\"; periods are second, minute, hour \
                 and day)",
            ),
            (
                "download_bytes_per_second = \"10Mb\"",
                "invalid size \"10Mb\": unknown unit \"Mb\" (did you mean \"MB\"?",
            ),
            (
                "upload_bytes_per_second = \"512B\"",
                "a shaping rate must be at least 1KiB per second, not 512B (slower stalls every tunnel; e.g. \"10MiB\")",
            ),
        ] {
            assert!(err(written).contains(expected), "{written}: {}", err(written));
        }
    }

    #[test]
    fn the_store_defaults_to_memory_and_redis_needs_a_url() {
        let parse = |s: &str| toml::from_str::<LimitDefaults>(s).map(|l| l.store).map_err(|e| e.to_string());
        assert_eq!(parse(""), Ok(StoreConfig::default()));
        assert_eq!(parse("[store]\nkind = \"memory\""), Ok(StoreConfig::default()));
        let redis = parse(
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\non_error = \"refuse\"\ntimeout = \"5ms\"\nlease_ttl = \"2s\"",
        );
        assert_eq!(
            redis,
            Ok(StoreConfig {
                kind: StoreKind::Redis,
                url: Some("redis://127.0.0.1:6379/0".into()),
                on_error: OnStoreError::Refuse,
                timeout: Duration::from_millis(5),
                lease_ttl: Duration::from_secs(2),
            })
        );
        let err = |s: &str| parse(s).err().unwrap_or_default();
        let e = err("[store]\nkind = \"redis\"");
        assert!(e.contains("kind = \"redis\" needs a url, e.g. url = \"redis://127.0.0.1:6379/0\""), "{e}");
        let e = err("[store]\nkind = \"redis\"\nurl = \"http://user:hunter2@x/\"");
        assert!(e.contains("invalid url \"http://user:***@x/\""), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("[store]\nkind = \"redis\"\nurl = \"redis://x\"\ntimeout = 20");
        assert!(e.contains("duration 20 has no unit: write e.g. \"20ms\""), "{e}");
        let e = err("[store]\nkind = \"redis\"\nurl = \"redis://x\"\ntimeout = \"20 ms\"");
        assert!(e.contains("invalid duration \"20 ms\": expected e.g. 20ms, 2s or 1m"), "{e}");
        let e = err("[store]\nkind = \"redis\"\nurl = \"redis://x\"\ntimeout = \"0ms\"");
        assert!(e.contains("timeout must be between 1ms and 10s, not 0ns"), "{e}");
        let e = err("[store]\nkind = \"redis\"\nurl = \"redis://x\"\nlease_ttl = \"100ms\"");
        assert!(e.contains("lease_ttl must be between 500ms and 1h"), "{e}");
        let e = err("[store]\nkind = \"rediss\"");
        assert!(e.contains("unknown variant `rediss`"), "{e}");
        let e = err("[store]\nurl = \"redis://x\"");
        assert!(e.contains("only read with kind = \"redis\""), "{e}");
        let e = err("[store]\nkind = \"redis\"\nurl = \"redis://x\"\nttl = \"1s\"");
        assert!(e.contains("unknown field `ttl`"), "{e}");
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
    }

    #[test]
    fn a_store_mistake_points_into_the_file() {
        let e = Config::parse("s.toml", "[limits]\nburst = 3\n[limits.store]\nkind = \"redis\"\n").unwrap_err();
        let e = e.to_string();
        assert!(e.starts_with("s.toml:"), "{e}");
        assert!(e.contains("needs a url"), "{e}");
    }
}
