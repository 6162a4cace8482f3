//! The route table of the `/api/` slice, as data: which method and path is which operation, which check
//! it passes, and the upstream path rebuilt from the parsed parts (never copied from the request). The
//! table is the allowlist: a refusal lists what it allows.

use std::sync::LazyLock;

use http::{Method, StatusCode};

use crate::refusal::{Fault, Refusal};

/// Which check a request passes before it is forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads of the bound repository.
    Read,
    /// A job's or run's log: GitHub redirects to signed storage, which sluice follows itself.
    Log,
    /// `POST …/pulls`: its `head` must be the working branch.
    CreatePull,
    /// `PATCH …/pulls/N` of a pull request from the working branch: title, body, state only.
    EditPull,
    /// `POST …/pulls/N/comments` on a pull request from the working branch (`in_reply_to` a comment of it).
    ReviewComment,
    /// `POST …/pulls/N/comments/ID/replies`: ID must be a review comment of that pull request.
    Reply,
    /// `POST …/pulls/N/reviews` with `event = COMMENT` on a pull request from the working branch.
    Review,
    /// `POST …/issues/N/comments`: a pull request from the working branch, or (with `comment_scope =
    /// "repository"`) any issue of the repository.
    IssueComment,
}

impl Access {
    pub fn is_write(self) -> bool {
        !matches!(self, Access::Read | Access::Log)
    }
}

/// Which methods a route answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    /// GET and HEAD.
    Read,
    Post,
    Patch,
}

impl Verb {
    fn matches(self, m: &Method) -> bool {
        match self {
            Verb::Read => m == Method::GET || m == Method::HEAD,
            Verb::Post => m == Method::POST,
            Verb::Patch => m == Method::PATCH,
        }
    }
}

/// One path segment of a route below `repos/OWNER/REPO`.
#[derive(Clone, Copy, Debug)]
enum Seg {
    Lit(&'static str),
    /// A positive number (pull request, issue, comment, run, job…); the text names it in listings.
    Num(&'static str),
    /// One segment naming a ref, a SHA, a tag, a label or a workflow file.
    Name,
    /// One or more such segments to the end (a file path, a ref with `/`, `BASE...HEAD`).
    Rest,
}

use Seg::{Lit, Name, Num, Rest};

struct Route {
    verb: Verb,
    pattern: &'static [Seg],
    op: &'static str,
    /// The group of SPEC §3.1 it belongs to, for the listing in refusals.
    family: &'static str,
    access: Access,
}

const fn read(pattern: &'static [Seg], op: &'static str, family: &'static str) -> Route {
    Route { verb: Verb::Read, pattern, op, family, access: Access::Read }
}

const REPO: &str = "the repository";
const ISSUES: &str = "issues with their comments, events, labels and timeline";
const PULLS: &str = "pull requests with their files, commits, reviews, review comments and requested reviewers";
const COMMITS: &str = "commits with their statuses, check runs and check suites";
const COMPARE: &str = "compare";
const CONTENTS: &str = "contents and readme";
const GIT: &str = "git trees, blobs, refs, commits and tags";
const BRANCHES: &str = "branches";
const RELEASES: &str = "releases and tags";
const LABELS: &str = "labels and milestones";
const ACTIONS: &str = "Actions workflows, runs, jobs and logs";

/// The whole slice sluice forwards; everything else is refused.
static ROUTES: &[Route] = &[
    read(&[], "api-get-repo", REPO),
    // Issues.
    read(&[Lit("issues")], "api-list-issues", ISSUES),
    read(&[Lit("issues"), Lit("comments")], "api-list-repo-issue-comments", ISSUES),
    read(&[Lit("issues"), Lit("comments"), Num("ID")], "api-get-issue-comment", ISSUES),
    read(&[Lit("issues"), Lit("events")], "api-list-repo-issue-events", ISSUES),
    read(&[Lit("issues"), Lit("events"), Num("ID")], "api-get-issue-event", ISSUES),
    read(&[Lit("issues"), Num("N")], "api-get-issue", ISSUES),
    read(&[Lit("issues"), Num("N"), Lit("comments")], "api-list-issue-comments", ISSUES),
    read(&[Lit("issues"), Num("N"), Lit("events")], "api-list-issue-events", ISSUES),
    read(&[Lit("issues"), Num("N"), Lit("labels")], "api-list-issue-labels", ISSUES),
    read(&[Lit("issues"), Num("N"), Lit("timeline")], "api-list-issue-timeline", ISSUES),
    // Pull requests.
    read(&[Lit("pulls")], "api-list-pulls", PULLS),
    read(&[Lit("pulls"), Lit("comments")], "api-list-repo-review-comments", PULLS),
    read(&[Lit("pulls"), Lit("comments"), Num("ID")], "api-get-review-comment", PULLS),
    read(&[Lit("pulls"), Num("N")], "api-get-pull", PULLS),
    read(&[Lit("pulls"), Num("N"), Lit("files")], "api-list-pull-files", PULLS),
    read(&[Lit("pulls"), Num("N"), Lit("commits")], "api-list-pull-commits", PULLS),
    read(&[Lit("pulls"), Num("N"), Lit("reviews")], "api-list-pull-reviews", PULLS),
    read(&[Lit("pulls"), Num("N"), Lit("reviews"), Num("ID")], "api-get-pull-review", PULLS),
    read(&[Lit("pulls"), Num("N"), Lit("reviews"), Num("ID"), Lit("comments")], "api-list-review-comments", PULLS),
    read(&[Lit("pulls"), Num("N"), Lit("comments")], "api-list-pull-comments", PULLS),
    read(&[Lit("pulls"), Num("N"), Lit("requested_reviewers")], "api-list-requested-reviewers", PULLS),
    // Commits and checks.
    read(&[Lit("commits")], "api-list-commits", COMMITS),
    read(&[Lit("commits"), Name], "api-get-commit", COMMITS),
    read(&[Lit("commits"), Name, Lit("statuses")], "api-list-commit-statuses", COMMITS),
    read(&[Lit("commits"), Name, Lit("status")], "api-get-combined-status", COMMITS),
    read(&[Lit("commits"), Name, Lit("check-runs")], "api-list-check-runs", COMMITS),
    read(&[Lit("commits"), Name, Lit("check-suites")], "api-list-check-suites", COMMITS),
    read(&[Lit("check-runs"), Num("ID")], "api-get-check-run", COMMITS),
    read(&[Lit("check-runs"), Num("ID"), Lit("annotations")], "api-list-check-run-annotations", COMMITS),
    read(&[Lit("check-suites"), Num("ID")], "api-get-check-suite", COMMITS),
    read(&[Lit("check-suites"), Num("ID"), Lit("check-runs")], "api-list-suite-check-runs", COMMITS),
    read(&[Lit("compare"), Rest], "api-compare", COMPARE),
    // Contents and git data.
    read(&[Lit("contents")], "api-get-contents", CONTENTS),
    read(&[Lit("contents"), Rest], "api-get-contents", CONTENTS),
    read(&[Lit("readme")], "api-get-readme", CONTENTS),
    read(&[Lit("readme"), Rest], "api-get-readme", CONTENTS),
    read(&[Lit("git"), Lit("trees"), Name], "api-get-tree", GIT),
    read(&[Lit("git"), Lit("blobs"), Name], "api-get-blob", GIT),
    read(&[Lit("git"), Lit("commits"), Name], "api-get-git-commit", GIT),
    read(&[Lit("git"), Lit("tags"), Name], "api-get-git-tag", GIT),
    read(&[Lit("git"), Lit("ref"), Rest], "api-get-ref", GIT),
    read(&[Lit("git"), Lit("matching-refs"), Rest], "api-list-matching-refs", GIT),
    // Branches, releases, tags, labels, milestones.
    read(&[Lit("branches")], "api-list-branches", BRANCHES),
    read(&[Lit("branches"), Rest], "api-get-branch", BRANCHES),
    read(&[Lit("releases")], "api-list-releases", RELEASES),
    read(&[Lit("releases"), Lit("latest")], "api-get-latest-release", RELEASES),
    read(&[Lit("releases"), Lit("tags"), Name], "api-get-release-by-tag", RELEASES),
    read(&[Lit("releases"), Num("ID")], "api-get-release", RELEASES),
    read(&[Lit("releases"), Num("ID"), Lit("assets")], "api-list-release-assets", RELEASES),
    read(&[Lit("tags")], "api-list-tags", RELEASES),
    read(&[Lit("labels")], "api-list-labels", LABELS),
    read(&[Lit("labels"), Name], "api-get-label", LABELS),
    read(&[Lit("milestones")], "api-list-milestones", LABELS),
    read(&[Lit("milestones"), Num("N")], "api-get-milestone", LABELS),
    read(&[Lit("milestones"), Num("N"), Lit("labels")], "api-list-milestone-labels", LABELS),
    // Actions.
    read(&[Lit("actions"), Lit("workflows")], "api-list-workflows", ACTIONS),
    read(&[Lit("actions"), Lit("workflows"), Name], "api-get-workflow", ACTIONS),
    read(&[Lit("actions"), Lit("workflows"), Name, Lit("runs")], "api-list-workflow-runs", ACTIONS),
    read(&[Lit("actions"), Lit("runs")], "api-list-runs", ACTIONS),
    read(&[Lit("actions"), Lit("runs"), Num("ID")], "api-get-run", ACTIONS),
    read(&[Lit("actions"), Lit("runs"), Num("ID"), Lit("jobs")], "api-list-run-jobs", ACTIONS),
    read(&[Lit("actions"), Lit("runs"), Num("ID"), Lit("attempts"), Num("N")], "api-get-run-attempt", ACTIONS),
    read(
        &[Lit("actions"), Lit("runs"), Num("ID"), Lit("attempts"), Num("N"), Lit("jobs")],
        "api-list-attempt-jobs",
        ACTIONS,
    ),
    read(&[Lit("actions"), Lit("jobs"), Num("ID")], "api-get-job", ACTIONS),
    Route {
        verb: Verb::Read,
        pattern: &[Lit("actions"), Lit("jobs"), Num("ID"), Lit("logs")],
        op: "api-get-job-logs",
        family: ACTIONS,
        access: Access::Log,
    },
    Route {
        verb: Verb::Read,
        pattern: &[Lit("actions"), Lit("runs"), Num("ID"), Lit("logs")],
        op: "api-get-run-logs",
        family: ACTIONS,
        access: Access::Log,
    },
    Route {
        verb: Verb::Read,
        pattern: &[Lit("actions"), Lit("runs"), Num("ID"), Lit("attempts"), Num("N"), Lit("logs")],
        op: "api-get-attempt-logs",
        family: ACTIONS,
        access: Access::Log,
    },
    // Writes.
    Route { verb: Verb::Post, pattern: &[Lit("pulls")], op: "api-create-pull", family: "", access: Access::CreatePull },
    Route {
        verb: Verb::Patch,
        pattern: &[Lit("pulls"), Num("N")],
        op: "api-edit-pull",
        family: "",
        access: Access::EditPull,
    },
    Route {
        verb: Verb::Post,
        pattern: &[Lit("pulls"), Num("N"), Lit("comments")],
        op: "api-comment-pull",
        family: "",
        access: Access::ReviewComment,
    },
    Route {
        verb: Verb::Post,
        pattern: &[Lit("pulls"), Num("N"), Lit("comments"), Num("ID"), Lit("replies")],
        op: "api-reply-review-comment",
        family: "",
        access: Access::Reply,
    },
    Route {
        verb: Verb::Post,
        pattern: &[Lit("pulls"), Num("N"), Lit("reviews")],
        op: "api-review-pull",
        family: "",
        access: Access::Review,
    },
    Route {
        verb: Verb::Post,
        pattern: &[Lit("issues"), Num("N"), Lit("comments")],
        op: "api-comment-issue",
        family: "",
        access: Access::IssueComment,
    },
];

/// What the slice allows, derived from the table: the read families, then every write.
pub static ALLOWED: LazyLock<String> = LazyLock::new(|| {
    let mut families: Vec<&str> = Vec::new();
    let mut writes: Vec<String> = Vec::new();
    for r in ROUTES {
        if r.verb == Verb::Read {
            if !families.contains(&r.family) {
                families.push(r.family);
            }
            continue;
        }
        let method = if r.verb == Verb::Post { "POST" } else { "PATCH" };
        let path: Vec<&str> = r
            .pattern
            .iter()
            .map(|s| match s {
                Lit(l) | Num(l) => *l,
                Name | Rest => "NAME",
            })
            .collect();
        writes.push(format!("{method} …/{}", path.join("/")));
    }
    format!(
        "allowed: reads (GET, HEAD) under /api/repos/OWNER/REPO of {}; writes {}",
        families.join("; "),
        writes.join(", ")
    )
});

/// A request in the slice: which repository (as the client spelled it), what, on which numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRoute {
    pub owner: String,
    pub repo: String,
    /// For the log line: `api-get-pull`, …
    pub op: &'static str,
    pub access: Access,
    /// The path below `repos/OWNER/REPO`, rebuilt from what was matched (numbers re-rendered).
    segs: Vec<String>,
    /// The first and second numbers in the path (a pull request and a comment, a run and an attempt).
    pub number: Option<u64>,
    pub second: Option<u64>,
    /// The client's query, forwarded on reads only.
    pub query: Option<String>,
}

impl ApiRoute {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }

    /// The path upstream, below the API base and without the leading `/`, rebuilt from the parsed parts.
    pub fn upstream_path(&self) -> String {
        let mut path = format!("repos/{}/{}", self.owner, self.repo);
        for s in &self.segs {
            path.push('/');
            path.push_str(s);
        }
        match &self.query {
            Some(q) if !q.is_empty() && !self.access.is_write() => format!("{path}?{q}"),
            _ => path,
        }
    }

    /// `repos/OWNER/REPO/pulls/N` for the pull request a write is about.
    pub(super) fn pull_path(&self) -> String {
        format!("repos/{}/{}/pulls/{}", self.owner, self.repo, self.number.unwrap_or_default())
    }

    /// `repos/OWNER/REPO/pulls/comments/ID` for a review comment a reply is about.
    pub(super) fn review_comment_path(&self, id: u64) -> String {
        format!("repos/{}/{}/pulls/comments/{id}", self.owner, self.repo)
    }
}

fn refused(code: &'static str, message: String) -> Refusal {
    Refusal::new(StatusCode::FORBIDDEN, code, Fault::Client, message)
}

/// GitHub owner and repository names: letters, digits, `-`, `_`, `.` (but not `.` or `..` alone).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A ref, SHA, tag, label, workflow file or path segment: URL-safe characters only (`%`, `.` and `..`
/// alone were refused already), so that it means the same upstream as here.
fn valid_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg.len() <= 255
        && seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+' | b'@' | b','))
}

fn number(seg: &str) -> Option<u64> {
    if seg.is_empty() || seg.len() > 19 || !seg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seg.parse().ok().filter(|n| *n > 0)
}

/// Routes never forwarded, even for reads: secrets and what guards or reaches into the repository's
/// settings. Checked by the first segments, before the table, so the refusal says why.
fn never(rest: &[&str]) -> Option<&'static str> {
    const NEVER: [&str; 8] =
        ["secrets", "variables", "keys", "hooks", "invitations", "environments", "collaborators", "deployments"];
    let head = rest.first().copied()?;
    if let Some(what) = NEVER.iter().find(|n| **n == head) {
        return Some(what);
    }
    let second = rest.get(1).copied()?;
    match (head, second) {
        ("actions" | "dependabot" | "codespaces" | "agents", "secrets") => Some("secrets"),
        ("actions" | "dependabot" | "codespaces" | "agents", "variables") => Some("variables"),
        _ => None,
    }
}

/// The write a request would be, when the slice refuses it for a reason of its own.
fn refused_write(method: &Method, rest: &[&str]) -> Option<&'static str> {
    let post = method == Method::POST;
    Some(match rest {
        ["pulls", _, "merge"] => "merging pull requests is not allowed through sluice; a person merges",
        ["merges"] | ["merge-upstream"] if post => "merging is not allowed through sluice; a person merges",
        ["pulls", _, "reviews", _, "events"] => "submitting reviews is not allowed through sluice",
        ["actions", "workflows", _, "dispatches"] | ["dispatches"] => {
            "dispatching workflows is not allowed through sluice"
        }
        ["actions", "runs", _, rerun] | ["actions", "jobs", _, rerun] if rerun.starts_with("rerun") => {
            "re-running workflows is not allowed through sluice"
        }
        ["actions", "runs", _, "cancel" | "force-cancel" | "approve"] => {
            "changing workflow runs is not allowed through sluice"
        }
        ["issues", _, "labels" | "assignees", ..] | ["labels", ..] | ["milestones", ..] if method != Method::GET => {
            "labels, assignees and milestones are not changed through sluice"
        }
        ["pulls", _, "requested_reviewers"] if method != Method::GET => {
            "requesting reviewers is not allowed through sluice"
        }
        _ if method == Method::DELETE => "deleting is not allowed through sluice",
        _ => return None,
    })
}

/// Matches `METHOD /api/…` against the route table. The path must be canonical (no `%` escapes, no empty,
/// `.` or `..` segments): the upstream path is rebuilt from the parsed parts, never copied.
pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<ApiRoute, Refusal> {
    // `/api/v3/` is where GitHub Enterprise serves REST, and where `gh` looks when GH_HOST is not github.com.
    let rest = path.strip_prefix("/api/v3/").or_else(|| path.strip_prefix("/api/")).unwrap_or_default();
    let segs: Vec<&str> = rest.strip_suffix('/').unwrap_or(rest).split('/').collect();
    if path.contains('%') || segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return Err(refused(
            "api_path_not_canonical",
            format!(
                "{path:?} is not a canonical API path; spell it /api/repos/OWNER/REPO/… without %-escapes, \
                 empty, \".\" or \"..\" segments"
            ),
        ));
    }
    let allowed = &*ALLOWED;
    let (owner, repo, rest) = match segs.as_slice() {
        ["graphql", ..] => {
            return Err(refused(
                "api_graphql",
                format!(
                    "{method} {path:?}: GraphQL is not forwarded (one query can reach any repository); use the REST routes; {allowed}"
                ),
            ));
        }
        ["repos", owner, repo, rest @ ..] if valid_name(owner) && valid_name(repo) => (*owner, *repo, rest),
        _ => {
            return Err(refused(
                "api_outside_repository",
                format!("{method} {path:?} is outside the repository-scoped API slice sluice forwards; {allowed}"),
            ));
        }
    };
    if let Some(what) = never(rest) {
        return Err(refused(
            "api_never_forwarded",
            format!(
                "{method} {path:?}: a repository's {what} are never forwarded, not even for reading (secrets, \
                 variables, keys, hooks, invitations, environments, collaborators and deployments stay with \
                 the operator); {allowed}"
            ),
        ));
    }
    if method != Method::GET
        && method != Method::HEAD
        && let Some(why) = refused_write(method, rest)
    {
        return Err(refused("api_write_not_allowed", format!("{method} {path:?}: {why}; {allowed}")));
    }
    'routes: for route in ROUTES {
        if !route.verb.matches(method) {
            continue;
        }
        let rest_at = route.pattern.iter().position(|s| matches!(s, Rest));
        match rest_at {
            Some(i) if rest.len() <= i => continue,
            None if rest.len() != route.pattern.len() => continue,
            _ => {}
        }
        let mut numbers = Vec::new();
        let mut out = Vec::with_capacity(rest.len());
        for (i, seg) in rest.iter().enumerate() {
            match route.pattern.get(i).copied().unwrap_or(Rest) {
                Lit(l) if l == *seg => out.push(l.to_owned()),
                Lit(_) => continue 'routes,
                Num(_) => match number(seg) {
                    Some(n) => {
                        numbers.push(n);
                        out.push(n.to_string());
                    }
                    None => continue 'routes,
                },
                Name | Rest if valid_segment(seg) => out.push((*seg).to_owned()),
                Name | Rest => continue 'routes,
            }
        }
        // `branches/NAME/protection…` is a setting, not a branch.
        if route.op == "api-get-branch" && rest.contains(&"protection") {
            continue;
        }
        return Ok(ApiRoute {
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            op: route.op,
            access: route.access,
            segs: out,
            number: numbers.first().copied(),
            second: numbers.get(1).copied(),
            query: query.map(str::to_owned),
        });
    }
    Err(refused(
        "api_route_not_allowed",
        format!("{method} {path:?} is not in the API slice sluice forwards; {allowed}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(m: Method, p: &str, q: Option<&str>) -> ApiRoute {
        parse(&m, p, q).unwrap_or_else(|e| panic!("{m} {p}: {}", e.message))
    }

    #[test]
    fn every_family_has_routes_and_upstream_paths_are_rebuilt() {
        type Case<'a> = (Method, &'a str, Option<&'a str>, &'a str, Access, &'a str);
        let cases: &[Case] = &[
            (Method::GET, "", None, "api-get-repo", Access::Read, "repos/acme/widgets"),
            (
                Method::HEAD,
                "/issues",
                Some("state=all"),
                "api-list-issues",
                Access::Read,
                "repos/acme/widgets/issues?state=all",
            ),
            (
                Method::GET,
                "/issues/7/timeline",
                None,
                "api-list-issue-timeline",
                Access::Read,
                "repos/acme/widgets/issues/7/timeline",
            ),
            (Method::GET, "/pulls/7/", None, "api-get-pull", Access::Read, "repos/acme/widgets/pulls/7"),
            (
                Method::GET,
                "/pulls/7/requested_reviewers",
                None,
                "api-list-requested-reviewers",
                Access::Read,
                "repos/acme/widgets/pulls/7/requested_reviewers",
            ),
            (
                Method::GET,
                "/commits/abc123/check-runs",
                None,
                "api-list-check-runs",
                Access::Read,
                "repos/acme/widgets/commits/abc123/check-runs",
            ),
            (
                Method::GET,
                "/compare/main...feature/x",
                None,
                "api-compare",
                Access::Read,
                "repos/acme/widgets/compare/main...feature/x",
            ),
            (
                Method::GET,
                "/contents/src/lib.rs",
                Some("ref=main"),
                "api-get-contents",
                Access::Read,
                "repos/acme/widgets/contents/src/lib.rs?ref=main",
            ),
            (
                Method::GET,
                "/git/ref/heads/feature/x",
                None,
                "api-get-ref",
                Access::Read,
                "repos/acme/widgets/git/ref/heads/feature/x",
            ),
            (
                Method::GET,
                "/branches/feature/x",
                None,
                "api-get-branch",
                Access::Read,
                "repos/acme/widgets/branches/feature/x",
            ),
            (
                Method::GET,
                "/releases/tags/v1.0",
                None,
                "api-get-release-by-tag",
                Access::Read,
                "repos/acme/widgets/releases/tags/v1.0",
            ),
            (Method::GET, "/milestones/3", None, "api-get-milestone", Access::Read, "repos/acme/widgets/milestones/3"),
            (
                Method::GET,
                "/actions/runs/0099/jobs",
                None,
                "api-list-run-jobs",
                Access::Read,
                "repos/acme/widgets/actions/runs/99/jobs",
            ),
            (
                Method::GET,
                "/actions/jobs/12/logs",
                None,
                "api-get-job-logs",
                Access::Log,
                "repos/acme/widgets/actions/jobs/12/logs",
            ),
            (Method::POST, "/pulls", Some("x=1"), "api-create-pull", Access::CreatePull, "repos/acme/widgets/pulls"),
            (Method::PATCH, "/pulls/7", None, "api-edit-pull", Access::EditPull, "repos/acme/widgets/pulls/7"),
            (
                Method::POST,
                "/pulls/7/comments/55/replies",
                None,
                "api-reply-review-comment",
                Access::Reply,
                "repos/acme/widgets/pulls/7/comments/55/replies",
            ),
            (
                Method::POST,
                "/issues/7/comments",
                None,
                "api-comment-issue",
                Access::IssueComment,
                "repos/acme/widgets/issues/7/comments",
            ),
        ];
        for (m, rest, q, op, access, upstream) in cases {
            let p = format!("/api/repos/acme/widgets{rest}");
            let got = ok(m.clone(), &p, *q);
            assert_eq!((got.op, got.access, got.upstream_path().as_str()), (*op, *access, *upstream), "{m} {p}");
            let v3 = p.replacen("/api/", "/api/v3/", 1);
            assert_eq!(parse(m, &v3, *q).as_ref(), Ok(&got), "{m} {v3}");
        }
        let reply = ok(Method::POST, "/api/repos/acme/widgets/pulls/7/comments/55/replies", None);
        assert_eq!((reply.number, reply.second), (Some(7), Some(55)));
        assert_eq!(reply.review_comment_path(55), "repos/acme/widgets/pulls/comments/55");
        assert_eq!(reply.pull_path(), "repos/acme/widgets/pulls/7");
    }

    #[test]
    fn the_listing_is_derived_from_the_table() {
        assert_eq!(
            ALLOWED.as_str(),
            "allowed: reads (GET, HEAD) under /api/repos/OWNER/REPO of the repository; issues with their comments, \
             events, labels and timeline; pull requests with their files, commits, reviews, review comments and \
             requested reviewers; commits with their statuses, check runs and check suites; compare; contents and \
             readme; git trees, blobs, refs, commits and tags; branches; releases and tags; labels and milestones; \
             Actions workflows, runs, jobs and logs; writes POST …/pulls, PATCH …/pulls/N, POST …/pulls/N/comments, \
             POST …/pulls/N/comments/ID/replies, POST …/pulls/N/reviews, POST …/issues/N/comments"
        );
    }

    #[test]
    fn everything_else_is_refused_naming_the_rule() {
        let refused = |m: Method, p: &str| {
            let r = parse(&m, p, None).unwrap_err();
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {p}");
            (r.code, r.message)
        };
        let allowed = &*ALLOWED;
        assert_eq!(
            refused(Method::PUT, "/api/repos/acme/widgets/pulls/7/merge"),
            (
                "api_write_not_allowed",
                format!(
                    "PUT \"/api/repos/acme/widgets/pulls/7/merge\": merging pull requests is not allowed through \
                     sluice; a person merges; {allowed}"
                )
            )
        );
        assert_eq!(
            refused(Method::POST, "/api/graphql"),
            (
                "api_graphql",
                format!(
                    "POST \"/api/graphql\": GraphQL is not forwarded (one query can reach any repository); use the \
                     REST routes; {allowed}"
                )
            )
        );
        assert_eq!(
            refused(Method::GET, "/api/user"),
            (
                "api_outside_repository",
                format!("GET \"/api/user\" is outside the repository-scoped API slice sluice forwards; {allowed}")
            )
        );
        for p in [
            "/api/repos/acme/widgets/actions/secrets",
            "/api/repos/acme/widgets/actions/variables/X",
            "/api/repos/acme/widgets/keys",
            "/api/repos/acme/widgets/hooks/1",
            "/api/repos/acme/widgets/invitations",
            "/api/repos/acme/widgets/environments/prod/secrets",
            "/api/repos/acme/widgets/dependabot/secrets",
        ] {
            assert_eq!(refused(Method::GET, p).0, "api_never_forwarded", "{p}");
        }
        for (m, p) in [
            (Method::POST, "/api/repos/acme/widgets/actions/workflows/ci.yml/dispatches"),
            (Method::POST, "/api/repos/acme/widgets/actions/runs/5/rerun-failed-jobs"),
            (Method::POST, "/api/repos/acme/widgets/issues/7/labels"),
            (Method::DELETE, "/api/repos/acme/widgets"),
            (Method::DELETE, "/api/repos/acme/widgets/issues/comments/5"),
        ] {
            assert_eq!(refused(m.clone(), p).0, "api_write_not_allowed", "{m} {p}");
        }
        assert!(refused(Method::GET, "/api/repos/acme/widgets/%70ulls").1.contains("is not a canonical API path"));
        assert!(refused(Method::GET, "/api/repos/acme/other/../widgets/pulls").1.contains("is not a canonical"));
        assert!(refused(Method::GET, "/api/repos//acme/widgets").1.contains("is not a canonical"));
        for (m, p) in [
            (Method::PATCH, "/api/repos/acme/widgets"),
            (Method::GET, "/api/repos/acme/widgets/pulls/0"),
            (Method::GET, "/api/repos/acme/widgets/pulls/x"),
            (Method::GET, "/api/repos/acme/widgets/pulls/-1"),
            (Method::PUT, "/api/repos/acme/widgets/pulls/7"),
            (Method::GET, "/api/repos/acme/widgets/branches/main/protection"),
            (Method::GET, "/api/repos/acme/widgets/contents/a b"),
            (Method::GET, "/api/repos/acme/widgets/traffic/views"),
            (Method::POST, "/api/repos/acme/widgets/issues"),
        ] {
            assert_eq!(refused(m.clone(), p).0, "api_route_not_allowed", "{m} {p}");
        }
    }
}
