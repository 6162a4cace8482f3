//! The smart-HTTP routes, matched on a normalised path so that `%2e`, `//`, `..`, `.git` and case
//! cannot make one repository look like another.

use std::fmt;

use http::Method;

/// The two git services sluice proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    UploadPack,
    ReceivePack,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::UploadPack => "git-upload-pack",
            Service::ReceivePack => "git-receive-pack",
        }
    }

    fn parse(name: &str) -> Option<Service> {
        match name {
            "git-upload-pack" => Some(Service::UploadPack),
            "git-receive-pack" => Some(Service::ReceivePack),
            _ => None,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Discovery (`GET info/refs?service=`) or the exchange itself (`POST git-…-pack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Advertise(Service),
    Rpc(Service),
}

impl Action {
    pub fn service(self) -> Service {
        match self {
            Action::Advertise(s) | Action::Rpc(s) => s,
        }
    }

    /// The path below `OWNER/REPO.git/` upstream, query included.
    pub fn upstream_suffix(self) -> String {
        match self {
            Action::Advertise(s) => format!("info/refs?service={s}"),
            Action::Rpc(s) => s.as_str().to_owned(),
        }
    }
}

/// A request sluice serves: which repository (as the client spelled it, `.git` removed) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub owner: String,
    pub repo: String,
    pub action: Action,
}

impl Route {
    /// `OWNER/REPO`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }

    /// Whether this is the repository `OWNER/REPO` names; GitHub compares names without case.
    pub fn is_repository(&self, full_name: &str) -> bool {
        full_name.eq_ignore_ascii_case(&self.full_name())
    }
}

/// Why a request matches no route; the message says what would.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoRoute(pub String);

impl fmt::Display for NoRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const ROUTES_HINT: &str = "expected GET /OWNER/REPO.git/info/refs?service=git-upload-pack|git-receive-pack \
     or POST /OWNER/REPO.git/git-upload-pack|git-receive-pack";

/// Decodes `%XX` escapes; only printable ASCII may result.
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            i += 3;
            u8::from_str_radix(hex, 16).ok()?
        } else {
            i += 1;
            bytes[i - 1]
        };
        if !(0x21..0x7f).contains(&b) || b == b'\\' {
            return None;
        }
        out.push(b);
    }
    String::from_utf8(out).ok()
}

/// Path segments with `.`, `..` and empty segments resolved; `None` when `..` climbs above the root.
fn segments(path: &str) -> Option<Vec<&str>> {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            s => out.push(s),
        }
    }
    Some(out)
}

/// GitHub owner and repository names: letters, digits, `-`, `_`, `.`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Matches a request against the routes.
pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Route, NoRoute> {
    let no_route = || NoRoute(format!("no git route for {method} {path:?}; {ROUTES_HINT}"));
    let decoded = percent_decode(path).ok_or_else(no_route)?;
    let segs = segments(&decoded).ok_or_else(no_route)?;
    if segs.first().is_some_and(|s| s.eq_ignore_ascii_case("api")) {
        // The handler sends a plain `/api/…` to the API routes; this is an escaped spelling of it.
        return Err(NoRoute(format!("{path:?}: spell API requests /api/repos/OWNER/REPO/… without %-escapes")));
    }
    let (owner, repo, rest) = match segs.as_slice() {
        [owner, repo, rest @ ..] => (*owner, *repo, rest),
        _ => return Err(no_route()),
    };
    let repo = match repo.len().checked_sub(4) {
        Some(cut) if repo.is_char_boundary(cut) && repo[cut..].eq_ignore_ascii_case(".git") => &repo[..cut],
        _ => repo,
    };
    if !valid_name(owner) || !valid_name(repo) {
        return Err(no_route());
    }
    let action = match (method, rest) {
        (&Method::GET, ["info", "refs"]) => {
            let service = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|pair| pair.strip_prefix("service="))
                .and_then(Service::parse)
                .ok_or_else(|| {
                    NoRoute(format!(
                        "{path:?} needs ?service=git-upload-pack or ?service=git-receive-pack \
                         (sluice speaks git's smart HTTP protocol only)"
                    ))
                })?;
            Action::Advertise(service)
        }
        (&Method::POST, [name]) => Action::Rpc(Service::parse(name).ok_or_else(no_route)?),
        _ => return Err(no_route()),
    };
    Ok(Route { owner: owner.to_owned(), repo: repo.to_owned(), action })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(owner: &str, repo: &str, action: Action) -> Route {
        Route { owner: owner.into(), repo: repo.into(), action }
    }

    #[test]
    fn matches_the_three_routes() {
        let adv = Action::Advertise(Service::UploadPack);
        assert_eq!(
            parse(&Method::GET, "/acme/widgets.git/info/refs", Some("service=git-upload-pack")),
            Ok(route("acme", "widgets", adv))
        );
        assert_eq!(
            parse(&Method::GET, "/acme/widgets/info/refs", Some("x=1&service=git-receive-pack")),
            Ok(route("acme", "widgets", Action::Advertise(Service::ReceivePack)))
        );
        assert_eq!(
            parse(&Method::POST, "/acme/widgets.git/git-upload-pack", None),
            Ok(route("acme", "widgets", Action::Rpc(Service::UploadPack)))
        );
        assert_eq!(
            parse(&Method::POST, "/acme/widgets.git/git-receive-pack", None),
            Ok(route("acme", "widgets", Action::Rpc(Service::ReceivePack)))
        );
    }

    #[test]
    fn normalises_before_comparing() {
        let adv = Action::Advertise(Service::UploadPack);
        let q = Some("service=git-upload-pack");
        for path in [
            "/acme/widgets.git/info/refs/",
            "//acme//widgets.git/info/refs",
            "/acme/./widgets.GIT/info/refs",
            "/acme/other/../widgets/info/refs",
            "/acme/other/%2e%2E/widgets/info/refs",
            "/acme/widgets%2egit/info/refs",
            "/%61cme/widgets/info/refs",
        ] {
            let r = parse(&Method::GET, path, q).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(r, route("acme", "widgets", adv), "{path}");
            assert!(r.is_repository("ACME/Widgets"), "{path}");
        }
        let r = parse(&Method::GET, "/ACME/Widgets.git/info/refs", q).unwrap();
        assert!(r.is_repository("acme/widgets"));
        assert!(!r.is_repository("acme/widgets2"));
    }

    #[test]
    fn everything_else_is_not_found() {
        let q = Some("service=git-upload-pack");
        let cases: &[(Method, &str, Option<&str>)] = &[
            (Method::GET, "/", None),
            (Method::GET, "/acme", q),
            (Method::GET, "/acme/widgets.git", q),
            (Method::GET, "/acme/widgets.git/HEAD", None),
            (Method::GET, "/acme/widgets.git/objects/info/packs", None),
            (Method::POST, "/acme/widgets.git/info/refs", q),
            (Method::GET, "/acme/widgets.git/git-upload-pack", None),
            (Method::POST, "/acme/widgets.git/git-upload-archive", None),
            (Method::GET, "/../acme/widgets/info/refs", q),
            (Method::GET, "/acme/.git/info/refs", q),
            (Method::GET, "/acme/wid%2fgets/info/refs", q),
            (Method::GET, "/acme/wid%00gets/info/refs", q),
            (Method::GET, "/acme/wid%zzgets/info/refs", q),
            (Method::GET, "/acme/wid%5cgets/info/refs", q),
            (Method::GET, "/acme/wid gets/info/refs", q),
            (Method::GET, "/acme/widgets/info/refs/extra", q),
            (Method::PUT, "/acme/widgets/git-receive-pack", None),
        ];
        for (m, p, q) in cases {
            let err = parse(m, p, *q).unwrap_err();
            assert!(err.0.starts_with(&format!("no git route for {m} {p:?}")), "{m} {p}: {err}");
        }
        assert_eq!(
            parse(&Method::GET, "/acme/widgets/info/refs", None).unwrap_err().0,
            "\"/acme/widgets/info/refs\" needs ?service=git-upload-pack or ?service=git-receive-pack \
             (sluice speaks git's smart HTTP protocol only)"
        );
        assert_eq!(
            parse(&Method::GET, "/%61pi/repos/acme/widgets/pulls", None).unwrap_err().0,
            "\"/%61pi/repos/acme/widgets/pulls\": spell API requests /api/repos/OWNER/REPO/… without %-escapes"
        );
    }
}
