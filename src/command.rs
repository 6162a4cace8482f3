//! The subcommands other than `serve` (`check`, `validate`, `token`, `ca`, `env`; `suggest` and `replay`
//! live in their own modules): what they print and the exit status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::credential::{Claims, KEY_ENV, Keyring, Kind, TOKEN_PREFIX, human_duration, now_unix, valid_session_id};
use crate::diagnostic::{Diagnostic, Severity};
use crate::policy::{Authority, Decision, Policy, PolicySet, Verdict};
use crate::policy::{DEFAULTS_FILE_NAME, DefaultList, parse_policy};

/// Exit status: allowed / valid.
pub const EXIT_OK: u8 = 0;
/// Exit status: denied / invalid.
pub const EXIT_DENY: u8 = 1;
/// Exit status: the command itself could not run (usage, configuration).
pub const EXIT_USAGE: u8 = 2;

pub struct CheckArgs {
    pub policies: Option<PathBuf>,
    pub policy: Option<String>,
    pub json: bool,
    pub destination: String,
    /// `--method M`: the destination is a URL, and its request is decided against `[[requests]]` too.
    pub method: Option<String>,
}

/// A `check --method` destination: `http://` or `https://` URL → authority and path.
fn check_url(url: &str) -> Result<(Authority, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let port = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("https") => 443,
        Some("http") => 80,
        _ => return Err("with --method, give a URL: https://HOST[:PORT]/PATH or http://…".into()),
    };
    let text = uri.authority().map(|a| a.as_str()).unwrap_or("");
    let authority = Authority::parse(text, Some(port)).map_err(|e| e.to_string())?;
    Ok((authority, uri.path().to_string()))
}

/// `sluice check`: decides one destination and prints the decision on one line (or as JSON).
pub fn check(args: &CheckArgs, out: &mut impl Write, err: &mut impl Write) -> u8 {
    usage_exit(err, check_with(args, out))
}

/// A subcommand's exit: its code, or (for a usage error: bad arguments, an unreadable policy or log) the
/// message and [`EXIT_USAGE`].
pub(crate) fn usage_exit(err: &mut impl Write, result: Result<u8, String>) -> u8 {
    result.unwrap_or_else(|msg| {
        let _ = writeln!(err, "{msg}");
        EXIT_USAGE
    })
}

/// Prints a report as one line of JSON or as its text; a failed write is a usage error's exit.
pub(crate) fn print_report(
    out: &mut impl Write,
    json: bool,
    report: &impl serde::Serialize,
    text: impl FnOnce() -> String,
) -> Result<(), String> {
    let printed = if json {
        serde_json::to_string(report).map_err(std::io::Error::other).and_then(|j| writeln!(out, "{j}"))
    } else {
        write!(out, "{}", text())
    };
    // The message would go where the report could not: stdout is gone, stderr may be too.
    printed.map_err(|e| format!("cannot write the report: {e}"))
}

fn check_with(args: &CheckArgs, out: &mut impl Write) -> Result<u8, String> {
    let set = load_set(args.policies.as_deref())?;
    let policy = resolve_policy(&set, args.policy.as_deref().unwrap_or("trusted"), "check")?;
    let parsed = match &args.method {
        Some(_) => check_url(&args.destination),
        None => Authority::parse(&args.destination, Some(443)).map(|a| (a, String::new())).map_err(|e| e.to_string()),
    };
    let (authority, path) = parsed.map_err(|e| format!("sluice check: {:?}: {e}", args.destination))?;
    let decision = policy.decide(&authority.target, authority.port);
    if let Some(method) = args.method.as_deref().filter(|_| decision.is_allowed()) {
        return Ok(check_request(&policy, &authority, method, &path, &decision, args.json, out));
    }
    let would_deny = !decision.is_allowed() && policy.mode.serves(&decision.reason);
    let printed = if args.json {
        let mut value = serde_json::json!({
            "destination": authority.to_string(),
            "verdict": if would_deny { Verdict::Allow } else { decision.verdict },
            "reason": decision.reason.to_string(),
            "reason_code": decision.reason.code(),
            "rule": decision.rule,
            "policy": decision.policy,
            "level": decision.level,
            "hint": decision.hint(&authority.target, authority.port),
        });
        if would_deny {
            value["would_deny"] = serde_json::json!(decision.reason.code());
            value["mode"] = serde_json::json!(policy.mode);
        }
        writeln!(out, "{value}")
    } else if would_deny {
        // Report mode serves it: the line says so first, then what an enforcing policy would decide.
        let line = check_line(&authority, &decision);
        let rest = line.strip_prefix("deny ").unwrap_or(&line);
        writeln!(out, "allow (report: would deny) {rest}")
    } else {
        writeln!(out, "{}", check_line(&authority, &decision))
    };
    printed.map_err(|e| format!("cannot write the decision: {e}"))?;
    Ok(if decision.is_allowed() || would_deny { EXIT_OK } else { EXIT_DENY })
}

/// `check --method`: the host's line, then the request's (or that no request rule names the host).
fn check_request(
    policy: &Policy,
    authority: &Authority,
    method: &str,
    path: &str,
    host: &Decision,
    json: bool,
    out: &mut impl Write,
) -> u8 {
    let request = policy.decide_request(&authority.target, authority.port, method, path, None);
    let printed = if json {
        let request_json = request.as_ref().map(|(d, max_body)| {
            serde_json::json!({
                "verdict": d.verdict,
                "reason": d.reason.to_string(),
                "reason_code": d.reason.code(),
                "rule": d.rule,
                "max_body": max_body,
                "hint": d.hint(&authority.target, authority.port),
            })
        });
        let value = serde_json::json!({
            "destination": authority.to_string(),
            "method": method,
            "path": crate::policy::path_spellings(path).swap_remove(0),
            "verdict": request.as_ref().map_or(host.verdict, |(d, _)| d.verdict),
            "host": { "reason": host.reason.to_string(), "reason_code": host.reason.code(), "rule": host.rule },
            "request": request_json,
            "policy": host.policy,
            "level": host.level,
            "terminated": policy.terminates(&authority.target, authority.port),
        });
        writeln!(out, "{value}")
    } else {
        let line = match &request {
            None => format!("request: no [[requests]] rule names {}: every request passes", authority.target),
            Some((d, max_body)) => {
                let rule = d.rule.as_ref().map_or_else(|| "rule=none".to_string(), |r| r.to_string());
                let max = max_body.map(|m| format!(" max_body={m}")).unwrap_or_default();
                format!(
                    "{} {method} {authority}{} {rule} reason={:?}{max}",
                    d.verdict.as_str(),
                    crate::policy::path_spellings(path).swap_remove(0),
                    d.reason.to_string()
                )
            }
        };
        writeln!(out, "{}\n{line}", check_line(authority, host))
    };
    if printed.is_err() {
        return EXIT_USAGE;
    }
    match request {
        Some((d, _)) if !d.is_allowed() => EXIT_DENY,
        _ => EXIT_OK,
    }
}

/// `allow|deny HOST:PORT policy=NAME level=LEVEL rule="PATTERN" (FILE:LINE, group "GROUP") reason="…"`
pub fn check_line(authority: &Authority, decision: &Decision) -> String {
    let rule = match &decision.rule {
        Some(r) => r.to_string(),
        None => "rule=none".to_string(),
    };
    format!(
        "{} {authority} policy={} level={} {rule} reason={:?}",
        decision.verdict.as_str(),
        decision.policy,
        decision.level,
        decision.reason.to_string()
    )
}

pub(crate) fn load_set(dir: Option<&Path>) -> Result<PolicySet, String> {
    let result = match dir {
        Some(d) => PolicySet::load_dir(d),
        None => PolicySet::load_dir_or_builtin(Path::new("policies")),
    };
    result.map_err(|d| format!("{d}\nsluice: the policy directory has errors; fix them or run `sluice validate`"))
}

/// A policy by name, or a policy file (a path that exists, or one ending in `.toml`). `command`
/// names the subcommand in messages.
pub(crate) fn resolve_policy(set: &PolicySet, which: &str, command: &str) -> Result<Arc<Policy>, String> {
    if which.ends_with(".toml") || Path::new(which).is_file() {
        let text = std::fs::read_to_string(which).map_err(|e| format!("sluice {command}: cannot read {which}: {e}"))?;
        return parse_policy(which, &text, set.defaults()).map(|(p, _)| Arc::new(p)).map_err(|d| d.to_string());
    }
    set.get(which).cloned().ok_or_else(|| {
        let known: Vec<&str> = set.names().collect();
        format!("sluice {command}: unknown policy {which:?}; known policies: {}", known.join(", "))
    })
}

/// `sluice validate`: checks every file named (directories: every `*.toml` in them), prints every
/// error and warning, and a summary. Exit 1 on any error.
pub fn validate(paths: &[PathBuf], out: &mut impl Write) -> u8 {
    let default_dir = [PathBuf::from("policies")];
    let paths = if paths.is_empty() { &default_dir[..] } else { paths };
    let mut diags: Vec<Diagnostic> = Vec::new();
    let mut files = 0usize;
    for path in paths {
        if path.is_dir() {
            files += crate::policy::toml_files(path).map(|f| f.len()).unwrap_or(0);
            let (_, d) = PolicySet::check_dir(path);
            diags.extend(d);
        } else {
            files += 1;
            diags.extend(validate_file(path));
        }
    }
    let errors = diags.iter().filter(|d| d.severity == Severity::Error).count();
    let warnings = diags.len() - errors;
    for d in &diags {
        let _ = writeln!(out, "{d}\n");
    }
    let _ = writeln!(
        out,
        "checked {files} file{}: {errors} error{}, {warnings} warning{}",
        plural(files),
        plural(errors),
        plural(warnings)
    );
    if errors > 0 { EXIT_DENY } else { EXIT_OK }
}

fn validate_file(path: &Path) -> Vec<Diagnostic> {
    let name = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return vec![Diagnostic::file_error(&name, format!("cannot read file: {e}"))],
    };
    if path.file_name().is_some_and(|f| f == DEFAULTS_FILE_NAME) {
        return match DefaultList::parse(&name, &text) {
            Ok((_, w)) => w,
            Err(d) => d.0,
        };
    }
    if is_server_config(path, &text) {
        return match crate::config::Config::parse(&name, &text) {
            Ok(_) => Vec::new(),
            Err(d) => d.0,
        };
    }
    // A policy file next to its own defaults.toml is checked against that list.
    let sibling = path.parent().map(|p| p.join(DEFAULTS_FILE_NAME));
    let defaults = sibling
        .filter(|p| p.is_file())
        .and_then(|p| {
            std::fs::read_to_string(&p).ok().and_then(|t| DefaultList::parse(&p.display().to_string(), &t).ok())
        })
        .map(|(list, _)| Arc::new(list))
        .unwrap_or_else(DefaultList::builtin);
    match parse_policy(&name, &text, &defaults) {
        Ok((_, w)) => w,
        Err(d) => d.0,
    }
}

/// `sluice.toml`, or a file whose top level has no `version` but a server table: a server
/// configuration rather than a policy.
fn is_server_config(path: &Path, text: &str) -> bool {
    const TABLES: [&str; 10] =
        ["egress", "auth", "policies", "resolver", "limits", "git", "admin", "log", "server", "inspect"];
    if path.file_name().is_some_and(|f| f == "sluice.toml") {
        return true;
    }
    match text.parse::<toml::Table>() {
        Ok(table) => !table.contains_key("version") && TABLES.iter().any(|t| table.contains_key(*t)),
        Err(_) => false,
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub struct MintArgs {
    pub kind: Kind,
    pub session: String,
    pub policy: Option<String>,
    pub repo: Option<String>,
    pub branch: Option<String>,
    pub ttl: String,
}

/// The signing key from `--key-file`, else `SLUICE_SIGNING_KEY`.
pub fn load_keyring(key_file: Option<&Path>, previous: Option<&Path>) -> Result<Keyring, String> {
    Keyring::load(key_file, previous)?.ok_or_else(|| format!("no signing key: pass --key-file FILE or set {KEY_ENV}"))
}

/// The claims `token mint` would sign, checked for what each kind needs.
pub fn mint_claims(args: &MintArgs, now: u64) -> Result<Claims, String> {
    if !valid_session_id(&args.session) {
        return Err(format!("invalid session id {:?}: use 1 to 128 letters, digits, '.', '-' or '_'", args.session));
    }
    let ttl = crate::config::parse_duration(&args.ttl)?;
    if ttl == 0 {
        return Err("--ttl must be longer than 0s".into());
    }
    let exp = now.saturating_add(ttl);
    match args.kind {
        Kind::Egress => {
            if args.repo.is_some() || args.branch.is_some() {
                return Err("--repo and --branch are for --kind git".into());
            }
            Ok(Claims::egress(&args.session, args.policy.as_deref().unwrap_or("trusted"), now, exp))
        }
        Kind::Git => {
            let repo = args.repo.as_deref().ok_or("--kind git needs --repo OWNER/REPO")?;
            let branch = args.branch.as_deref().ok_or("--kind git needs --branch BRANCH")?;
            if repo.split('/').count() != 2 || repo.split('/').any(|p| p.is_empty()) {
                return Err(format!("invalid --repo {repo:?}: expected OWNER/REPO"));
            }
            if args.policy.is_some() {
                return Err("--policy is for --kind egress".into());
            }
            let branch = branch.strip_prefix("refs/heads/").unwrap_or(branch);
            Ok(Claims::git(&args.session, repo, branch, now, exp))
        }
    }
}

/// `sluice token mint`: prints one token.
pub fn token_mint(args: &MintArgs, keys: &Keyring, out: &mut impl Write) -> Result<(), String> {
    let claims = mint_claims(args, now_unix())?;
    writeln!(out, "{}", keys.mint(&claims)).map_err(|e| e.to_string())
}

/// `sluice token inspect`: prints the claims (readable without a key) and whether the token verifies.
/// Exit 0 when it verifies, 1 when it does not, 2 when it cannot be read at all.
pub fn token_inspect(token: &str, keys: Option<&Keyring>, out: &mut impl Write) -> u8 {
    let token = token.trim();
    let claims = token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split('.').next())
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok());
    let Some(claims) = claims else {
        let _ = writeln!(out, "not a sluice v1 token");
        return EXIT_USAGE;
    };
    let _ = writeln!(out, "claims: {claims}");
    let now = now_unix();
    for (name, key) in [("iat", "issued"), ("exp", "expires")] {
        if let Some(t) = claims.get(name).and_then(serde_json::Value::as_u64) {
            let rel = if t >= now {
                format!("in {}", human_duration(t - now))
            } else {
                format!("{} ago", human_duration(now - t))
            };
            let _ = writeln!(out, "{key}: {t} ({rel})");
        }
    }
    match keys {
        None => {
            let _ = writeln!(out, "verifies: unknown (no key: pass --key-file or set {KEY_ENV})");
            EXIT_USAGE
        }
        Some(k) => match k.verify(token, now) {
            Ok(_) => {
                let _ = writeln!(out, "verifies: yes");
                EXIT_OK
            }
            Err(e) => {
                let _ = writeln!(out, "verifies: no ({e})");
                EXIT_DENY
            }
        },
    }
}

/// `sluice ca init --dir DIR`: writes a fresh inspection CA and says how to use it.
pub fn ca_init(dir: &Path, out: &mut impl Write, err: &mut impl Write) -> u8 {
    match crate::inspect::ca::init(dir) {
        Ok(files) => {
            let quote = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
            let _ = writeln!(out, "wrote {} (the certificate sandboxes trust)", files.cert.display());
            let _ =
                writeln!(out, "wrote {} (mode 0600: the private key; keep it on this machine)", files.key.display());
            let _ = writeln!(out, "SHA-256 fingerprint: {}", files.fingerprint);
            let _ = writeln!(
                out,
                "\nadd to sluice.toml:\n[inspect]\nca_cert = {}\nca_key = {}",
                quote(&files.cert),
                quote(&files.key)
            );
            EXIT_OK
        }
        Err(e) => {
            let _ = writeln!(err, "sluice ca init: {e}");
            EXIT_USAGE
        }
    }
}

/// Where `sluice ca show` finds the certificate.
pub enum CaSource {
    /// `[inspect] ca_cert` of this server configuration.
    Config(PathBuf),
    /// `ca.pem` in a directory `ca init` wrote.
    Dir(PathBuf),
}

/// `sluice ca show`: the CA certificate (PEM) and its SHA-256 fingerprint.
pub fn ca_show(source: &CaSource, out: &mut impl Write, err: &mut impl Write) -> u8 {
    let path = match source {
        CaSource::Dir(dir) => dir.join(crate::inspect::ca::CERT_FILE),
        CaSource::Config(file) => match crate::config::Config::load(file) {
            Ok(config) => match config.inspect.ca_cert {
                Some(p) => p,
                None => {
                    let _ = writeln!(err, "sluice ca show: {} sets no [inspect] ca_cert", file.display());
                    return EXIT_USAGE;
                }
            },
            Err(d) => {
                let _ = writeln!(err, "{d}");
                return EXIT_USAGE;
            }
        },
    };
    match crate::inspect::ca::read_cert(&path) {
        Ok((pem, der)) => {
            let _ = write!(out, "{pem}");
            let _ = writeln!(out, "SHA-256 fingerprint: {}", crate::inspect::fingerprint_sha256(&der));
            EXIT_OK
        }
        Err(e) => {
            let _ = writeln!(err, "sluice ca show: {e}");
            EXIT_USAGE
        }
    }
}

/// `sluice env`: what a sandbox image sources to send its traffic through sluice.
pub struct EnvArgs {
    pub session: String,
    pub policy: Option<String>,
    /// How the sandbox reaches the proxy, `HOST:PORT` (default: `[egress] listen`).
    pub proxy: String,
    pub ttl: String,
    /// Where the sandbox keeps the sluice CA alone (additive trust: Node).
    pub ca_cert: String,
    /// Where the sandbox's whole trust bundle is once the CA is installed in it (replacing trust:
    /// OpenSSL, Python, pip, git, cargo, Ruby, Go).
    pub ca_bundle: String,
}

/// Single-quotes `value` for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// The lines `sluice env` prints: proxy variables with a fresh credential, an empty `NO_PROXY` (so
/// nothing bypasses the proxy), and the CA variables each common client reads.
pub fn env_lines(args: &EnvArgs, token: &str) -> String {
    let url = format!("http://{}:{token}@{}", args.session, args.proxy);
    let (host, port) = args.proxy.rsplit_once(':').unwrap_or((args.proxy.as_str(), "3128"));
    let java = format!(
        "-Dhttps.proxyHost={host} -Dhttps.proxyPort={port} -Dhttp.proxyHost={host} -Dhttp.proxyPort={port} \
         -Dhttps.proxyUser={s} -Dhttps.proxyPassword={token} -Dhttp.proxyUser={s} -Dhttp.proxyPassword={token} \
         -Djdk.http.auth.tunneling.disabledSchemes= -Djdk.http.auth.proxying.disabledSchemes=",
        s = args.session
    );
    let (cert, bundle) = (args.ca_cert.as_str(), args.ca_bundle.as_str());
    let vars: [(&str, &str, &str); 20] = [
        ("HTTPS_PROXY", &url, "every client: CONNECT through sluice with the session's credential"),
        ("https_proxy", &url, "curl and others read the lower-case form"),
        ("HTTP_PROXY", &url, "plain http:// requests"),
        ("http_proxy", &url, ""),
        ("ALL_PROXY", &url, ""),
        ("NO_PROXY", "", "nothing bypasses the proxy"),
        ("no_proxy", "", ""),
        ("SSL_CERT_FILE", bundle, "OpenSSL, Python ssl, Ruby, Go"),
        ("CURL_CA_BUNDLE", bundle, "curl"),
        ("REQUESTS_CA_BUNDLE", bundle, "Python requests"),
        ("PIP_CERT", bundle, "pip"),
        ("GIT_SSL_CAINFO", bundle, "git"),
        ("CARGO_HTTP_CAINFO", bundle, "cargo"),
        ("NODE_EXTRA_CA_CERTS", cert, "Node (added to its own roots)"),
        ("NODE_USE_ENV_PROXY", "1", "Node >= 24: fetch and https honour HTTPS_PROXY"),
        ("NPM_CONFIG_CAFILE", bundle, "npm"),
        ("npm_config_proxy", &url, "npm"),
        ("npm_config_https_proxy", &url, ""),
        ("YARN_HTTPS_CA_FILE_PATH", bundle, "yarn berry"),
        ("JAVA_TOOL_OPTIONS", &java, "Java: the proxy, and Basic allowed for CONNECT"),
    ];
    let mut out = String::new();
    out.push_str(&format!(
        "# sluice egress for session {} (policy {}); source this file in the sandbox\n",
        args.session,
        args.policy.as_deref().unwrap_or("trusted")
    ));
    out.push_str(&format!(
        "# install the CA first (as root): put `sluice ca show` output at {cert}, then run update-ca-certificates,\n\
         # which adds it to {bundle}; Java: keytool -importcert -cacerts -alias sluice -file {cert}\n"
    ));
    for (name, value, why) in vars {
        if !why.is_empty() {
            out.push_str(&format!("# {why}\n"));
        }
        out.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    out
}

/// `sluice env`: mints an egress credential and prints [`env_lines`].
pub fn env(args: &EnvArgs, keys: &Keyring, out: &mut impl Write) -> Result<(), String> {
    let mint = MintArgs {
        kind: Kind::Egress,
        session: args.session.clone(),
        policy: args.policy.clone(),
        repo: None,
        branch: None,
        ttl: args.ttl.clone(),
    };
    let token = keys.mint(&mint_claims(&mint, now_unix())?);
    write!(out, "{}", env_lines(args, &token)).map_err(|e| e.to_string())
}
