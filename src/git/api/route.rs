//! The route table of the `/api/` slice, as data: which method and path is which operation, which check
//! it passes, and the upstream path rebuilt from the parsed parts (never copied from the request).

use http::Method;

use super::Refusal;

const ALLOWED: &str = "allowed: GET /api/repos/OWNER/REPO, GET …/pulls, GET …/pulls/N, GET …/pulls/N/files, \
     GET …/pulls/N/comments, GET …/issues/N/comments, POST …/pulls, PATCH …/pulls/N, POST …/pulls/N/comments, \
     POST …/issues/N/comments";

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    GetRepo,
    ListPulls,
    GetPull,
    ListPullFiles,
    ListPullComments,
    ListIssueComments,
    CreatePull,
    EditPull,
    CommentPull,
    CommentIssue,
}

/// Which check a request passes before it is forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads of the bound repository.
    Read,
    /// Opening a pull request: its `head` must be the working branch.
    Create,
    /// Writes to one pull request: it must be one whose head is the working branch.
    OwnPull,
}

impl Op {
    pub fn access(self) -> Access {
        match self {
            Op::GetRepo
            | Op::ListPulls
            | Op::GetPull
            | Op::ListPullFiles
            | Op::ListPullComments
            | Op::ListIssueComments => Access::Read,
            Op::CreatePull => Access::Create,
            Op::EditPull | Op::CommentPull | Op::CommentIssue => Access::OwnPull,
        }
    }

    /// For the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::GetRepo => "api-get-repo",
            Op::ListPulls => "api-list-pulls",
            Op::GetPull => "api-get-pull",
            Op::ListPullFiles => "api-list-pull-files",
            Op::ListPullComments => "api-list-pull-comments",
            Op::ListIssueComments => "api-list-issue-comments",
            Op::CreatePull => "api-create-pull",
            Op::EditPull => "api-edit-pull",
            Op::CommentPull => "api-comment-pull",
            Op::CommentIssue => "api-comment-issue",
        }
    }
}

/// One path segment of a route below `repos/OWNER/REPO`.
#[derive(Clone, Copy, Debug)]
enum Seg {
    Lit(&'static str),
    /// A pull request or issue number.
    Number,
}

use Seg::{Lit, Number};

/// The whole slice sluice forwards; everything else is refused.
static ROUTES: [(Method, &[Seg], Op); 10] = [
    (Method::GET, &[], Op::GetRepo),
    (Method::GET, &[Lit("pulls")], Op::ListPulls),
    (Method::GET, &[Lit("pulls"), Number], Op::GetPull),
    (Method::GET, &[Lit("pulls"), Number, Lit("files")], Op::ListPullFiles),
    (Method::GET, &[Lit("pulls"), Number, Lit("comments")], Op::ListPullComments),
    (Method::GET, &[Lit("issues"), Number, Lit("comments")], Op::ListIssueComments),
    (Method::POST, &[Lit("pulls")], Op::CreatePull),
    (Method::PATCH, &[Lit("pulls"), Number], Op::EditPull),
    (Method::POST, &[Lit("pulls"), Number, Lit("comments")], Op::CommentPull),
    (Method::POST, &[Lit("issues"), Number, Lit("comments")], Op::CommentIssue),
];

/// A request in the slice: which repository (as the client spelled it), what, on which number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRoute {
    pub owner: String,
    pub repo: String,
    pub op: Op,
    pub number: Option<u64>,
    /// The client's query, forwarded on reads only.
    pub query: Option<String>,
}

impl ApiRoute {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }

    /// The path upstream, below the API base and without the leading `/`, rebuilt from the parsed parts.
    pub fn upstream_path(&self) -> String {
        let base = format!("repos/{}/{}", self.owner, self.repo);
        let n = self.number.unwrap_or_default();
        let path = match self.op {
            Op::GetRepo => base,
            Op::ListPulls | Op::CreatePull => format!("{base}/pulls"),
            Op::GetPull | Op::EditPull => format!("{base}/pulls/{n}"),
            Op::ListPullFiles => format!("{base}/pulls/{n}/files"),
            Op::ListPullComments | Op::CommentPull => format!("{base}/pulls/{n}/comments"),
            Op::ListIssueComments | Op::CommentIssue => format!("{base}/issues/{n}/comments"),
        };
        match (&self.query, self.op.access()) {
            (Some(q), Access::Read) if !q.is_empty() => format!("{path}?{q}"),
            _ => path,
        }
    }

    /// `GET …/pulls/N` for the pull request a write is about.
    pub(super) fn lookup_path(&self) -> String {
        format!("repos/{}/{}/pulls/{}", self.owner, self.repo, self.number.unwrap_or_default())
    }
}

/// GitHub owner and repository names: letters, digits, `-`, `_`, `.` (but not `.` or `..` alone).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn number(seg: &str) -> Option<u64> {
    if seg.is_empty() || seg.len() > 12 || !seg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seg.parse().ok().filter(|n| *n > 0)
}

/// Matches `METHOD /api/…` against the route table. The path must be canonical (no `%` escapes, no empty,
/// `.` or `..` segments): the upstream path is rebuilt from the parsed parts, never copied.
pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<ApiRoute, Refusal> {
    // `/api/v3/` is where GitHub Enterprise serves REST, and where `gh` looks when GH_HOST is not github.com.
    let rest = path.strip_prefix("/api/v3/").or_else(|| path.strip_prefix("/api/")).unwrap_or_default();
    let segs: Vec<&str> = rest.strip_suffix('/').unwrap_or(rest).split('/').collect();
    if path.contains('%') || segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return Err(Refusal::forbidden(format!(
            "sluice: {path:?} is not a canonical API path; spell it /api/repos/OWNER/REPO/… without %-escapes, \
             empty, \".\" or \"..\" segments"
        )));
    }
    let not_in_slice = |what: String| Refusal::forbidden(format!("sluice: {what}; {ALLOWED}"));
    let (owner, repo, rest) = match segs.as_slice() {
        ["graphql", ..] => {
            return Err(not_in_slice(format!(
                "{method} {path:?}: GraphQL is not forwarded (one query can reach any repository); \
                 use the REST routes"
            )));
        }
        ["repos", owner, repo, rest @ ..] if valid_name(owner) && valid_name(repo) => (*owner, *repo, rest),
        _ => {
            return Err(not_in_slice(format!(
                "{method} {path:?} is outside the repository-scoped API slice sluice forwards"
            )));
        }
    };
    if matches!(rest, ["pulls", _, "merge"]) {
        return Err(not_in_slice(format!(
            "{method} {path:?}: merging pull requests is not allowed through sluice; a person merges"
        )));
    }
    for (m, pattern, op) in &ROUTES {
        if m != method || pattern.len() != rest.len() {
            continue;
        }
        let mut n = None;
        let matched = pattern.iter().zip(rest).all(|(p, s)| match p {
            Lit(lit) => lit == s,
            Number => {
                n = number(s);
                n.is_some()
            }
        });
        if matched {
            return Ok(ApiRoute {
                owner: owner.to_owned(),
                repo: repo.to_owned(),
                op: *op,
                number: n,
                query: query.map(str::to_owned),
            });
        }
    }
    Err(not_in_slice(format!("{method} {path:?} is not in the pull-request slice sluice forwards")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn route(op: Op, number: Option<u64>, query: Option<&str>) -> ApiRoute {
        ApiRoute { owner: "acme".into(), repo: "widgets".into(), op, number, query: query.map(Into::into) }
    }

    #[test]
    fn the_route_table_matches_the_slice() {
        let cases: &[(Method, &str, Option<&str>, ApiRoute, &str)] = &[
            (Method::GET, "/api/repos/acme/widgets", None, route(Op::GetRepo, None, None), "repos/acme/widgets"),
            (
                Method::GET,
                "/api/repos/acme/widgets/pulls",
                Some("state=all&page=2"),
                route(Op::ListPulls, None, Some("state=all&page=2")),
                "repos/acme/widgets/pulls?state=all&page=2",
            ),
            (
                Method::GET,
                "/api/repos/acme/widgets/pulls/7/",
                None,
                route(Op::GetPull, Some(7), None),
                "repos/acme/widgets/pulls/7",
            ),
            (
                Method::GET,
                "/api/repos/acme/widgets/pulls/7/files",
                None,
                route(Op::ListPullFiles, Some(7), None),
                "repos/acme/widgets/pulls/7/files",
            ),
            (
                Method::GET,
                "/api/repos/acme/widgets/pulls/7/comments",
                None,
                route(Op::ListPullComments, Some(7), None),
                "repos/acme/widgets/pulls/7/comments",
            ),
            (
                Method::GET,
                "/api/repos/acme/widgets/issues/7/comments",
                None,
                route(Op::ListIssueComments, Some(7), None),
                "repos/acme/widgets/issues/7/comments",
            ),
            (
                Method::POST,
                "/api/repos/acme/widgets/pulls",
                Some("x=1"),
                route(Op::CreatePull, None, Some("x=1")),
                "repos/acme/widgets/pulls",
            ),
            (
                Method::PATCH,
                "/api/repos/acme/widgets/pulls/7",
                None,
                route(Op::EditPull, Some(7), None),
                "repos/acme/widgets/pulls/7",
            ),
            (
                Method::POST,
                "/api/repos/acme/widgets/pulls/7/comments",
                None,
                route(Op::CommentPull, Some(7), None),
                "repos/acme/widgets/pulls/7/comments",
            ),
            (
                Method::POST,
                "/api/repos/acme/widgets/issues/7/comments",
                None,
                route(Op::CommentIssue, Some(7), None),
                "repos/acme/widgets/issues/7/comments",
            ),
        ];
        for (m, p, q, want, upstream) in cases {
            let got = parse(m, p, *q).unwrap_or_else(|e| panic!("{m} {p}: {}", e.message));
            assert_eq!(&got, want, "{m} {p}");
            assert_eq!(got.upstream_path(), *upstream, "{m} {p}");
            let v3 = p.replacen("/api/", "/api/v3/", 1);
            assert_eq!(parse(m, &v3, *q).as_ref(), Ok(want), "{m} {v3}");
        }
    }

    #[test]
    fn everything_else_is_refused_with_a_reason() {
        let refused = |m: Method, p: &str| {
            let r = parse(&m, p, None).unwrap_err();
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {p}");
            r.message
        };
        assert_eq!(
            refused(Method::PUT, "/api/repos/acme/widgets/pulls/7/merge"),
            format!(
                "sluice: PUT \"/api/repos/acme/widgets/pulls/7/merge\": merging pull requests is not allowed \
                 through sluice; a person merges; {ALLOWED}"
            )
        );
        assert_eq!(
            refused(Method::POST, "/api/graphql"),
            format!(
                "sluice: POST \"/api/graphql\": GraphQL is not forwarded (one query can reach any repository); \
                 use the REST routes; {ALLOWED}"
            )
        );
        assert_eq!(
            refused(Method::DELETE, "/api/repos/acme/widgets/git/refs/heads/main"),
            format!(
                "sluice: DELETE \"/api/repos/acme/widgets/git/refs/heads/main\" is not in the pull-request slice \
                 sluice forwards; {ALLOWED}"
            )
        );
        assert_eq!(
            refused(Method::GET, "/api/user"),
            format!("sluice: GET \"/api/user\" is outside the repository-scoped API slice sluice forwards; {ALLOWED}")
        );
        assert!(refused(Method::GET, "/api/repos/acme/widgets/%70ulls").contains("is not a canonical API path"));
        assert!(refused(Method::GET, "/api/repos/acme/other/../widgets/pulls").contains("is not a canonical"));
        assert!(refused(Method::GET, "/api/repos//acme/widgets").contains("is not a canonical"));
        for (m, p) in [
            (Method::DELETE, "/api/repos/acme/widgets"),
            (Method::PATCH, "/api/repos/acme/widgets"),
            (Method::POST, "/api/repos/acme/widgets/actions/workflows/ci.yml/dispatches"),
            (Method::GET, "/api/repos/acme/widgets/pulls/0"),
            (Method::GET, "/api/repos/acme/widgets/pulls/x"),
            (Method::GET, "/api/repos/acme/widgets/pulls/-1"),
            (Method::PUT, "/api/repos/acme/widgets/pulls/7"),
            (Method::GET, "/api/repos/acme/widgets/contents/README"),
            (Method::DELETE, "/api/repos/acme/widgets/issues/comments/5"),
        ] {
            assert!(refused(m.clone(), p).contains("is not in the pull-request slice"), "{m} {p}");
        }
    }
}
