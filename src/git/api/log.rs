//! Job and run logs: GitHub answers `…/actions/jobs/ID/logs` with a redirect to a signed storage URL.
//! sluice follows it itself — without any credential, only to `[git] log_hosts`, with the redirect's own
//! scheme, dialled through `net` with the address guard (`[git] log_allow_ips` lifts it) — and streams
//! the log back, so the sandbox needs no egress rule and never sees the signed URL.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::{API_TIMEOUT, Api};
use crate::git::{BoxError, GitBody, GitProxy};
use crate::policy::Host;
use crate::refusal::{Fault, Refusal};

/// A log whose storage sends nothing for this long is cut off, so a stalled storage cannot hold the
/// sandbox's request open for ever.
const LOG_IDLE: Duration = Duration::from_secs(60);

/// The storage's body, failing when no frame arrives for `LOG_IDLE`.
struct IdleBody {
    inner: Incoming,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + LOG_IDLE;
                self.timer.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the log storage sent nothing for {}s; the log is cut off",
                    LOG_IDLE.as_secs()
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Storage response headers passed back with a log.
const LOG_HEADERS: [header::HeaderName; 4] =
    [header::CONTENT_TYPE, header::CONTENT_LENGTH, header::LAST_MODIFIED, header::ETAG];

impl Api {
    /// Whether `host:port` is one of `[git] log_hosts`: an entry with a port allows exactly it, one
    /// without allows the scheme's default port.
    fn log_host_allowed(&self, host: &str, port: u16, default_port: u16) -> bool {
        let Ok(host) = Host::parse(host) else { return false };
        self.log_hosts.iter().any(|h| h.0.matches_host(&host) && h.0.port().unwrap_or(default_port) == port)
    }
}

fn refused_redirect(message: String) -> Refusal {
    Refusal::new(StatusCode::BAD_GATEWAY, "api_log_redirect_refused", Fault::Upstream, message)
}

impl GitProxy {
    /// Follows the upstream's redirect for a log and streams what the storage answers. Messages name
    /// the storage host, never the signed URL.
    pub(super) async fn follow_log(
        &self,
        resp: Response<Incoming>,
        method: &Method,
        client: &HeaderMap,
    ) -> Result<Response<GitBody>, Refusal> {
        let api_host = self.api.upstream.authority();
        let status = resp.status();
        let location = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        // GitHub's rate-limit headers on the redirect go back with the log, so tools can back off.
        let limits: Vec<_> = resp
            .headers()
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("x-ratelimit-"))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        drop(resp);
        let location = location
            .ok_or_else(|| refused_redirect(format!("{api_host} answered {status} for a log without a Location")))?;
        let uri: Uri = location
            .parse()
            .map_err(|_| refused_redirect(format!("{api_host} redirected the log to a URL sluice cannot read")))?;
        let default_port = match uri.scheme_str() {
            Some("https") => 443,
            Some("http") => 80,
            _ => return Err(refused_redirect(format!("{api_host} redirected the log to a URL that is not http(s)"))),
        };
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(default_port);
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) || host.is_empty() {
            return Err(refused_redirect(format!("{api_host} redirected the log to a URL with no plain host")));
        }
        if !self.api.log_host_allowed(&host, port, default_port) {
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "api_log_host_not_allowed",
                Fault::Upstream,
                format!(
                    "{api_host} redirected the log to {host}:{port}, which is not in [git] log_hosts; the \
                     operator adds the storage host there"
                ),
            ));
        }
        let agent = client.get(header::USER_AGENT).cloned().unwrap_or(HeaderValue::from_static("sluice"));
        // No Authorization, no cookie, nothing of the sandbox's: the URL's signature is the credential.
        let req = Request::builder()
            .method(if method == Method::HEAD { Method::HEAD } else { Method::GET })
            .uri(uri)
            .header(header::USER_AGENT, agent)
            .body(Empty::<Bytes>::new())
            .map_err(|_| refused_redirect(format!("{api_host} redirected the log to a URL sluice cannot request")))?;
        let authority = format!("{host}:{port}");
        let stored = tokio::time::timeout(API_TIMEOUT, self.api.storage.send(req, &authority))
            .await
            .map_err(|_| {
                Refusal::unreachable(
                    "upstream_timeout",
                    true,
                    format!("the log storage {authority} did not answer within {}s", API_TIMEOUT.as_secs()),
                )
            })?
            // The error names the host and address only; it never carries the URL.
            .map_err(|e| {
                Refusal::unreachable(
                    e.code(),
                    matches!(e, crate::git::upstream::UpstreamError::Timeout(_)),
                    e.to_string(),
                )
            })?;
        let status = stored.status();
        if !status.is_success() {
            return Err(Refusal::bad_upstream(format!("the log storage {authority} answered {status}")));
        }
        let (up, body) = stored.into_parts();
        let body = IdleBody { inner: body, timer: Box::pin(tokio::time::sleep(LOG_IDLE)) };
        let mut out = Response::new(body.boxed());
        for name in LOG_HEADERS {
            if let Some(v) = up.headers.get(&name) {
                out.headers_mut().insert(name, v.clone());
            }
        }
        out.headers_mut().extend(limits);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{GitSettings, LogHost};
    use crate::git::upstream::Dialer;
    use crate::policy::HostPattern;

    #[test]
    fn log_hosts_match_by_pattern_and_port() {
        let mut settings = GitSettings::default();
        let api = super::Api::new(&settings, &Dialer::system().unwrap()).unwrap();
        assert!(api.log_host_allowed("productionresultssa7.blob.core.windows.net", 443, 443));
        assert!(api.log_host_allowed("pipelines.actions.githubusercontent.com", 443, 443));
        assert!(!api.log_host_allowed("productionresultssa7.blob.core.windows.net", 8443, 443));
        assert!(!api.log_host_allowed("evil.blob.core.windows.net", 443, 443));
        assert!(!api.log_host_allowed("127.0.0.1", 443, 443));
        settings.log_hosts = vec![LogHost(HostPattern::parse("logs.test:8080").unwrap())];
        let api = super::Api::new(&settings, &Dialer::system().unwrap()).unwrap();
        assert!(api.log_host_allowed("logs.test", 8080, 80));
        assert!(!api.log_host_allowed("logs.test", 80, 80));
    }
}
