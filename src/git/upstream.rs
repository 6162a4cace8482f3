//! The upstream side: one HTTP/1.1 exchange per request to the configured git host, carrying the
//! real token instead of the sandbox's credential, never following redirects.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::credential::Secret;

/// How long dialling the upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request headers git needs upstream; everything else (the sandbox's `Authorization` first of all)
/// stays behind.
pub const FORWARDED_REQUEST_HEADERS: [header::HeaderName; 5] =
    [header::ACCEPT, header::ACCEPT_ENCODING, header::CONTENT_TYPE, header::CONTENT_ENCODING, header::USER_AGENT];

/// The `Git-Protocol` header (protocol v2 negotiation).
pub const GIT_PROTOCOL: &str = "git-protocol";

/// Response headers passed back to the client.
pub const FORWARDED_RESPONSE_HEADERS: [header::HeaderName; 5] =
    [header::CONTENT_TYPE, header::CONTENT_ENCODING, header::CACHE_CONTROL, header::EXPIRES, header::PRAGMA];

/// Why the upstream exchange failed. Messages name the upstream host, never a credential.
#[derive(Debug)]
pub enum UpstreamError {
    Connect(String),
    Timeout(String),
    Exchange(String),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect(m) | UpstreamError::Timeout(m) | UpstreamError::Exchange(m) => f.write_str(m),
        }
    }
}

/// A parsed `upstream` URL: `http://` or `https://`, a host, an optional port and path prefix.
pub struct Upstream {
    tls: Option<TlsConnector>,
    host: String,
    port: u16,
    /// `host[:port]`, for the `Host` header and messages.
    authority: String,
    /// Without a trailing `/`; empty for `https://github.com`.
    base_path: String,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        write!(f, "Upstream({scheme}://{}{})", self.authority, self.base_path)
    }
}

impl Upstream {
    /// Parses `https://github.com`, `http://127.0.0.1:8080/git`, …
    pub fn parse(key: &str, url: &str) -> Result<Upstream, String> {
        let bad = |why: &str| format!("invalid {key} {url:?}: {why}");
        let uri: http::Uri = url.parse().map_err(|_| bad("expected a URL such as \"https://github.com\""))?;
        let tls = match uri.scheme_str() {
            Some("https") => Some(tls_connector()),
            Some("http") => None,
            _ => return Err(bad("expected an http:// or https:// URL")),
        };
        let authority = uri.authority().ok_or_else(|| bad("the URL has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials do not belong in the URL; use token_env, token_file or [git.tokens]"));
        }
        if uri.query().is_some() {
            return Err(bad("the URL must not have a query"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = authority.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
        Ok(Upstream {
            tls,
            host,
            port,
            authority: authority.as_str().to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// `host[:port]`, for messages.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `http[s]://host[:port]/base`, as configured, without a trailing `/`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.base_path)
    }

    /// Sends one request to `{base}/{path_and_query}` with the given headers (already filtered) and the
    /// real token's `Authorization` value ([`basic_auth`] or [`bearer_auth`]), when there is one.
    pub async fn send<B>(
        &self,
        method: Method,
        path_and_query: &str,
        mut headers: HeaderMap,
        authorization: Option<HeaderValue>,
        body: B,
    ) -> Result<Response<Incoming>, UpstreamError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        headers.remove(header::AUTHORIZATION);
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, value);
        }
        let host = HeaderValue::from_str(&self.authority)
            .map_err(|_| UpstreamError::Exchange(format!("invalid upstream host {:?}", self.authority)))?;
        headers.insert(header::HOST, host);
        let target = format!("{}/{}", self.base_path, path_and_query);
        let mut req =
            Request::builder().method(method).uri(&target).body(body).map_err(|e| {
                UpstreamError::Exchange(format!("cannot build the upstream request for {target:?}: {e}"))
            })?;
        *req.headers_mut() = headers;

        let dial = TcpStream::connect((self.host.as_str(), self.port));
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(UpstreamError::Connect(format!("cannot connect to {}: {e}", self.authority))),
            Err(_) => {
                return Err(UpstreamError::Timeout(format!(
                    "connecting to {} took longer than {}s",
                    self.authority,
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let _ = tcp.set_nodelay(true);
        let result = match &self.tls {
            None => exchange(tcp, req).await,
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|_| UpstreamError::Connect(format!("invalid TLS server name {:?}", self.host)))?;
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| UpstreamError::Timeout(format!("TLS handshake with {} timed out", self.authority)))?
                    .map_err(|e| {
                        UpstreamError::Connect(format!("TLS handshake with {} failed: {e}", self.authority))
                    })?;
                exchange(tls, req).await
            }
        };
        result.map_err(|e| UpstreamError::Exchange(format!("exchange with {} failed: {e}", self.authority)))
    }
}

async fn exchange<S, B>(io: S, req: Request<B>) -> Result<Response<Incoming>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    // The connection task lives until the response body has been read to the end.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(target: "sluice::git", error = %e, "upstream connection ended with an error");
        }
    });
    sender.send_request(req).await
}

fn tls_connector() -> TlsConnector {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The ring provider supports the default protocol versions, so this builder step cannot fail;
    // fall back to an explicit TLS 1.3 list all the same rather than panic.
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .or_else(|_| {
            rustls::ClientConfig::builder_with_provider(provider).with_protocol_versions(&[&rustls::version::TLS13])
        });
    let mut config = match builder {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        Err(_) => unreachable!("ring supports TLS 1.3"),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// `Basic base64("x-access-token:" + token)`, marked sensitive so hyper never logs it.
pub fn basic_auth(token: &Secret<String>) -> HeaderValue {
    let encoded = STANDARD.encode(format!("x-access-token:{}", token.expose()));
    match HeaderValue::from_str(&format!("Basic {encoded}")) {
        Ok(mut v) => {
            v.set_sensitive(true);
            v
        }
        // Base64 output is always a valid header value.
        Err(_) => HeaderValue::from_static(""),
    }
}

/// `Bearer TOKEN`, the form the GitHub REST API documents, marked sensitive so hyper never logs it.
pub fn bearer_auth(token: &Secret<String>) -> HeaderValue {
    match HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
        Ok(mut v) => {
            v.set_sensitive(true);
            v
        }
        // `check_token` admits printable ASCII only, which is always a valid header value.
        Err(_) => HeaderValue::from_static(""),
    }
}

/// Removes the token from text that came from upstream: the raw value and its base64 forms (alone
/// and as `x-access-token:TOKEN`, standard and URL-safe, padded or not), see [`super::scrub`].
pub fn scrub(text: &str, token: Option<&Secret<String>>) -> String {
    super::scrub::Scrubber::new(token).text(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[test]
    fn parses_upstream_urls() {
        let u = Upstream::parse("git.upstream", "https://github.com").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.base_path.as_str(), u.tls.is_some()), ("github.com", 443, "", true));
        let u = Upstream::parse("git.upstream", "http://127.0.0.1:8080/git/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str(), u.authority()),
            ("127.0.0.1", 8080, "/git", "127.0.0.1:8080")
        );
        assert_eq!(
            Upstream::parse("git.upstream", "ftp://x").unwrap_err(),
            "invalid git.upstream \"ftp://x\": expected an http:// or https:// URL"
        );
        assert_eq!(
            Upstream::parse("git.upstream", "https://u:p@github.com").unwrap_err(),
            "invalid git.upstream \"https://u:p@github.com\": credentials do not belong in the URL; use token_env, token_file or [git.tokens]"
        );
    }

    #[test]
    fn scrub_removes_every_form_of_the_token() {
        let token = Secret::new("ghp_S3cr3t/+=".to_owned());
        let b64 = STANDARD.encode("x-access-token:ghp_S3cr3t/+=");
        let text = format!("a ghp_S3cr3t/+= b {b64} c {} d", URL_SAFE_NO_PAD.encode("ghp_S3cr3t/+="));
        let clean = scrub(&text, Some(&token));
        assert_eq!(clean, "a [redacted] b [redacted] c [redacted] d");
        assert_eq!(scrub("plain", None), "plain");
        let v = basic_auth(&token);
        assert!(v.is_sensitive());
        assert_eq!(v.to_str().unwrap(), format!("Basic {b64}"));
    }
}
