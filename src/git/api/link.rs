//! Pointing the upstream's `Link` and `Location` URLs back at sluice: only URLs of the credential's
//! repository are rewritten, every other one is dropped.

/// Where upstream URLs point and where the rewritten ones go.
#[derive(Clone, Debug)]
pub struct LinkMap<'a> {
    /// The configured API base, e.g. `https://api.github.com`.
    pub upstream: &'a str,
    /// Sluice's API base as the client reached it, e.g. `http://127.0.0.1:3129/api`.
    pub client: &'a str,
    /// The credential's repository, `OWNER/REPO`.
    pub repo: &'a str,
    /// Its numeric id upstream, when known: `/repositories/ID/…` URLs map only when it matches.
    pub repo_id: Option<u64>,
}

impl LinkMap<'_> {
    /// An upstream URL of the credential's repository, rewritten to sluice; `None` for anything else.
    /// `…/repos/OWNER/REPO/rest` keeps its form; `…/repositories/ID/rest` becomes `…/repos/OWNER/REPO/rest`.
    pub fn url(&self, url: &str) -> Option<String> {
        let rest = url.strip_prefix(self.upstream)?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let tail = if let Some(after) = path.strip_prefix("/repos/") {
            let mut parts = after.splitn(3, '/');
            let (owner, repo) = (parts.next()?, parts.next()?);
            if !format!("{owner}/{repo}").eq_ignore_ascii_case(self.repo) {
                return None;
            }
            parts.next().map(|t| format!("/{t}")).unwrap_or_default()
        } else if let Some(after) = path.strip_prefix("/repositories/") {
            let (id, tail) = after.split_once('/').map_or((after, String::new()), |(i, t)| (i, format!("/{t}")));
            if self.repo_id.is_none() || id.parse::<u64>().ok() != self.repo_id {
                return None;
            }
            tail
        } else {
            return None;
        };
        if tail.contains("..") || tail.contains('%') || tail.contains("//") {
            return None;
        }
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        Some(format!("{}/repos/{}{tail}{query}", self.client, self.repo))
    }

    /// A `Link` header with every URL rewritten; links that do not map are dropped, and `None` means
    /// none is left.
    pub fn link(&self, value: &str) -> Option<String> {
        let kept: Vec<String> = link_entries(value)
            .into_iter()
            .filter_map(|(url, params)| self.url(url).map(|u| format!("<{u}>{params}")))
            .collect();
        (!kept.is_empty()).then(|| kept.join(", "))
    }
}

/// `<url>; rel="next", <url>; rel="last"` → `[(url, "; rel=\"next\""), …]`. URLs are whatever lies between
/// `<` and `>`; an entry without them is skipped.
fn link_entries(value: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('<') {
        let Some(len) = rest[start + 1..].find('>') else { break };
        let url = &rest[start + 1..start + 1 + len];
        let after = &rest[start + 2 + len..];
        let end = after.find('<').unwrap_or(after.len());
        let params = after[..end].trim_end().trim_end_matches(',').trim_end();
        out.push((url, params));
        rest = &after[end..];
    }
    out
}

/// Whether any link uses the `/repositories/ID/…` form (then the repository's id is needed to map it).
pub fn needs_repo_id(value: &str, upstream: &str) -> bool {
    link_entries(value).iter().any(|(url, _)| url.starts_with(&format!("{upstream}/repositories/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_point_back_at_sluice() {
        let map = LinkMap {
            upstream: "https://api.github.com",
            client: "http://127.0.0.1:3129/api",
            repo: "acme/widgets",
            repo_id: Some(123),
        };
        assert_eq!(
            map.link(
                "<https://api.github.com/repositories/123/pulls?page=2>; rel=\"next\", \
                 <https://api.github.com/repos/Acme/Widgets/pulls?page=5>; rel=\"last\""
            )
            .as_deref(),
            Some(
                "<http://127.0.0.1:3129/api/repos/acme/widgets/pulls?page=2>; rel=\"next\", \
                 <http://127.0.0.1:3129/api/repos/acme/widgets/pulls?page=5>; rel=\"last\""
            )
        );
        // Another repository, another id, another host, a climbing path: dropped, the rest kept.
        assert_eq!(
            map.link(
                "<https://api.github.com/repositories/999/pulls?page=2>; rel=\"next\", \
                 <https://api.github.com/repos/acme/gears/pulls?page=2>; rel=\"next\", \
                 <https://evil.example/repos/acme/widgets/pulls?page=2>; rel=\"next\", \
                 <https://api.github.com/repos/acme/widgets/../../user>; rel=\"x\", \
                 <https://api.github.com/repos/acme/widgets/pulls?page=1>; rel=\"first\""
            )
            .as_deref(),
            Some("<http://127.0.0.1:3129/api/repos/acme/widgets/pulls?page=1>; rel=\"first\"")
        );
        assert_eq!(map.link("<https://api.github.com/user/repos?page=2>; rel=\"next\""), None);
        assert_eq!(map.link("garbage"), None);
        let unknown_id = LinkMap { repo_id: None, ..map.clone() };
        assert_eq!(unknown_id.link("<https://api.github.com/repositories/123/pulls?page=2>; rel=\"next\""), None);
        assert_eq!(
            map.url("https://api.github.com/repos/acme/widgets/pulls/5").as_deref(),
            Some("http://127.0.0.1:3129/api/repos/acme/widgets/pulls/5")
        );
        assert_eq!(
            map.url("https://api.github.com/repos/acme/widgets").as_deref(),
            Some("http://127.0.0.1:3129/api/repos/acme/widgets")
        );
        assert_eq!(map.url("https://api.github.com.evil/repos/acme/widgets"), None);
        assert!(needs_repo_id("<https://api.github.com/repositories/1/pulls>; rel=\"next\"", "https://api.github.com"));
        assert!(!needs_repo_id("<https://api.github.com/repos/a/b/pulls>; rel=\"next\"", "https://api.github.com"));
    }
}
