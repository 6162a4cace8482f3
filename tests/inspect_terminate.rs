//! TLS termination end to end (SPEC §8): real clients (curl over HTTP/1.1 and HTTP/2, hyper's HTTP/2
//! client, Python urllib, node) through tunnels sluice terminates with its CA's leaves; request rules
//! and the fronting guard decided per inner request; one decision record per request naming method
//! and path; upstream certificates verified against an rcgen "public" CA given as `extra_roots`
//! (expired, wrong-name and unknown-CA upstreams refused `502`); passthrough hosts never terminated.
//! Everything stays on 127.0.0.1.

#[path = "support/cgi.rs"]
#[allow(dead_code)]
mod cgi;
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(30);
const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-terminate-test";

/// The test upstreams' "public" CA: sluice trusts it through `[inspect] extra_roots`.
struct PublicCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl PublicCa {
    fn new(name: &str) -> PublicCa {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test root"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("ca cert");
        let pem = cert.pem();
        let issuer = Issuer::from_ca_cert_der(cert.der(), key).expect("issuer");
        PublicCa { pem, issuer }
    }

    /// A server certificate for `names`, valid now (or expired years ago), offering `alpn`.
    fn leaf(&self, names: &[&str], expired: bool, alpn: &[&[u8]]) -> TestCert {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("leaf params");
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der)
            .expect("server cert");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TestCert { pem: cert.pem(), server_config: Arc::new(config) }
    }
}

/// An upstream that speaks HTTP/1.1 and HTTP/2 (ALPN), answering `VERSION PATH host=HOST` (and `/te`
/// with the `te` header it got); counts the connections it accepted.
async fn auto_upstream(cert: &TestCert) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config.clone());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(tls)) = tokio::time::timeout(STEP, acceptor.accept(stream)).await else { return };
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let host = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| req.headers().get("host").and_then(|h| h.to_str().ok()).map(str::to_string));
                    let mut text =
                        format!("{:?} {} host={}\n", req.version(), req.uri().path(), host.unwrap_or_default());
                    if req.uri().path() == "/te" {
                        let te = req.headers().get("te").and_then(|v| v.to_str().ok()).unwrap_or("");
                        text = format!("te={te}\n");
                    }
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
            });
        }
    });
    (addr, accepted)
}

/// An upstream whose `/ws` switches protocols (101) and then echoes what it reads.
async fn upgrade_upstream(cert: &TestCert) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(tls)) = tokio::time::timeout(STEP, acceptor.accept(stream)).await else { return };
                let service = hyper::service::service_fn(|mut req: Request<hyper::body::Incoming>| async move {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(up) = on.await else { return };
                        let mut io = hyper_util::rt::TokioIo::new(up);
                        let mut buf = [0u8; 64];
                        while let Ok(Ok(n)) = tokio::time::timeout(STEP, io.read(&mut buf)).await {
                            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                    let mut resp = Response::new(Empty::<Bytes>::new());
                    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut().insert("upgrade", "websocket".parse().expect("value"));
                    resp.headers_mut().insert("connection", "upgrade".parse().expect("value"));
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .with_upgrades();
                let _ = conn.await;
            });
        }
    });
    addr
}

fn lab_policy(api: u16, h2: u16, ws: u16, bad: [u16; 3]) -> String {
    format!(
        r#"version = 1
name = "lab"
level = "custom"
allow = ["api.test:{api}", "pass.test:{api}", "h2.test:{h2}", "expired.test:{e}", "wrong.test:{w}", "unknown.test:{u}", "ws.test:{ws}"]
allow_ips = ["127.0.0.0/8"]
tls_passthrough = ["pass.test"]

[[requests]]
hosts = ["api.test", "pass.test"]
methods = ["GET", "HEAD"]
paths = ["/ok/**", "/bytes/*", "/headers"]
action = "allow"

[[requests]]
hosts = ["api.test"]
methods = ["POST"]
paths = ["/sha256"]
action = "allow"
max_body = "1KiB"

[[requests]]
hosts = ["api.test"]
paths = ["/ok/secret/**"]
action = "deny"

[[requests]]
hosts = ["h2.test", "expired.test", "wrong.test", "unknown.test", "ws.test"]
action = "allow"
"#,
        e = bad[0],
        w = bad[1],
        u = bad[2],
    )
}

struct Lab {
    proxy: Proxy,
    api: Upstream,
    /// Port of the api upstream (and of pass.test, the same server).
    port: u16,
    h2: u16,
    /// Connections the h2 upstream accepted.
    h2_accepted: Arc<std::sync::atomic::AtomicUsize>,
    ws: u16,
    bad: [u16; 3],
    /// sluice's CA certificate (what sandboxes trust).
    ca: std::path::PathBuf,
    /// The public CA's certificate.
    public: std::path::PathBuf,
    _upstreams: Vec<Upstream>,
}

async fn lab(mode: &str) -> Lab {
    lab_with(mode, "", "").await
}

/// [`lab`] with `policy_extra` appended to the policy (e.g. a `[limits]` table) and `egress_extra`
/// lines in the server's `[egress]` table.
async fn lab_with(mode: &str, policy_extra: &str, egress_extra: &str) -> Lab {
    let public = PublicCa::new("public");
    let other = PublicCa::new("other");
    let api = Upstream::tls("api", &public.leaf(&["api.test", "pass.test"], false, &[])).await;
    let (h2, h2_accepted) = auto_upstream(&public.leaf(&["h2.test"], false, &[b"h2", b"http/1.1"])).await;
    let ws = upgrade_upstream(&public.leaf(&["ws.test"], false, &[b"http/1.1"])).await;
    let expired = Upstream::tls("expired", &public.leaf(&["expired.test"], true, &[])).await;
    let wrong = Upstream::tls("wrong", &public.leaf(&["other.test"], false, &[])).await;
    let unknown = Upstream::tls("unknown", &other.leaf(&["unknown.test"], false, &[])).await;
    let dir = TempDir::new("terminate");
    let files = sluice::inspect::ca::init(&dir.path().join("ca")).expect("ca init");
    let public_pem = dir.write("public.pem", &public.pem);
    let key = dir.write("key", KEY);
    let names =
        ["api.test", "pass.test", "h2.test", "expired.test", "wrong.test", "unknown.test", "evil.test", "ws.test"];
    let hosts: Vec<String> = names.iter().map(|n| format!("{n:?} = [\"127.0.0.1\"]")).collect();
    let auth =
        if mode == "credential" { format!("[auth]\nanonymous = false\nkey_file = {key:?}\n") } else { String::new() };
    let config = format!(
        "[egress]\npolicy = \"lab\"\n{egress_extra}{auth}[resolver]\nhosts = {{ {} }}\n[inspect]\nca_cert = {:?}\nca_key = {:?}\nextra_roots = [{:?}]\n",
        hosts.join(", "),
        files.cert,
        files.key,
        public_pem
    );
    let bad = [expired.port(), wrong.port(), unknown.port()];
    let port = api.port();
    let policy = lab_policy(port, h2.port(), ws.port(), bad) + policy_extra;
    let proxy = Proxy::start_recorded(dir, &config, &[("lab.toml", &policy)]).await;
    Lab {
        proxy,
        api,
        port,
        h2: h2.port(),
        h2_accepted,
        ws: ws.port(),
        bad,
        ca: files.cert,
        public: public_pem,
        _upstreams: vec![expired, wrong, unknown],
    }
}

impl Lab {
    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    /// curl through the proxy trusting only sluice's CA.
    async fn curl(&self, args: &[&str]) -> Outcome {
        let proxy = self.proxy.url();
        let ca = self.ca.to_str().expect("path");
        let mut all = vec!["-x", &proxy, "--cacert", ca, "-i"];
        all.extend_from_slice(args);
        curl(&all, LIMIT).await
    }

    /// The decision records of inner requests written so far (at least `want`), parsed.
    async fn inspected(&self, want: usize) -> Vec<Value> {
        for _ in 0..200 {
            let found: Vec<Value> = self
                .proxy
                .records()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["event"] == "decision" && v["inspected"] == true)
                .collect();
            if found.len() >= want {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {want} inspected decision records: {:#?}", self.proxy.records());
    }

    fn all_records(&self) -> Vec<Value> {
        self.proxy.records().iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect()
    }
}

fn status_line(out: &Outcome) -> &str {
    // Skip the proxy's `200 Connection established`-style head curl prints first with -i.
    let heads: Vec<&str> = out.stdout.split("\r\n\r\n").collect();
    heads.iter().rev().nth(1).and_then(|h| h.lines().next()).unwrap_or_default().trim_end()
}

fn body(out: &Outcome) -> &str {
    out.stdout.rsplit_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// What one inner record says, for comparisons.
fn brief(v: &Value) -> (String, String, String, String, u64) {
    (
        v["method"].as_str().unwrap_or("").to_string(),
        v["path"].as_str().unwrap_or("").to_string(),
        v["verdict"].as_str().unwrap_or("").to_string(),
        v["reason"].as_str().unwrap_or("").to_string(),
        v["status"].as_u64().unwrap_or(0),
    )
}

fn b(m: &str, p: &str, verdict: &str, reason: &str, status: u64) -> (String, String, String, String, u64) {
    (m.into(), p.into(), verdict.into(), reason.into(), status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http1_and_http2_is_decided_per_request_inside_the_tunnel() {
    let lab = lab("anonymous").await;
    // HTTP/1.1: the content arrives, from the upstream, through sluice's leaf.
    let out = lab.curl(&["--http1.1", &lab.url("api.test", "/ok/one?q=secret")]).await;
    assert_eq!((status_line(&out), body(&out)), ("HTTP/1.1 200 OK", "hello from api /ok/one\n"), "{out:?}");
    // HTTP/2 to the client (the upstream leg is HTTP/1.1: its own ALPN).
    let out = lab.curl(&["--http2", "-w", "\n%{http_version}", &lab.url("api.test", "/ok/two")]).await;
    assert!(out.stdout.starts_with("HTTP/1.1 200") || out.stdout.contains("HTTP/2 200"), "{out:?}");
    assert!(out.stdout.ends_with("hello from api /ok/two\n\n2"), "{out:?}");
    // Refused inside the tunnel: a real HTTP answer with §2's body and header.
    let out = lab.curl(&["--http1.1", "-X", "POST", "-d", "x", &lab.url("api.test", "/ok/one")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 403 Forbidden", "{out:?}");
    assert!(out.stdout.contains("x-sluice-decision: deny; reason=no_request_rule; policy=lab"), "{out:?}");
    assert!(body(&out).starts_with("sluice: request to api.test:"), "{out:?}");
    // Deny beats allow: /ok/** allows GET, /ok/secret/** denies.
    let out = lab.curl(&["--http2", &lab.url("api.test", "/ok/secret/k")]).await;
    assert!(out.stdout.contains("HTTP/2 403"), "{out:?}");
    assert!(out.stdout.contains("reason:      GET /ok/secret/k is refused by a request rule"), "{out:?}");
    let records = lab.inspected(4).await;
    let got: Vec<_> = records.iter().map(brief).collect();
    assert_eq!(
        got,
        [
            b("GET", "/ok/one", "allow", "request_allowed", 0),
            b("GET", "/ok/two", "allow", "request_allowed", 0),
            b("POST", "/ok/one", "deny", "no_request_rule", 403),
            b("GET", "/ok/secret/k", "deny", "request_denied", 403),
        ]
    );
    assert_eq!(records[0]["host"], "api.test");
    assert_eq!(records[0]["port"], lab.port);
    assert!(records[0]["rule"].as_str().unwrap_or("").contains("lab.toml:8"), "{}", records[0]);
    assert!(records[3]["rule"].as_str().unwrap_or("").contains("lab.toml:21"), "{}", records[3]);
    // Each allowed request's finish line has its status and bytes; the tunnels' lines say connect.
    let finished: Vec<Value> =
        lab.all_records().into_iter().filter(|v| v["event"] == "request_finished" && v["inspected"] == true).collect();
    assert!(
        finished.iter().any(|v| v["path"] == "/ok/one" && v["status"] == 200 && v["bytes_down"] == 23),
        "{finished:#?}"
    );
    // One upstream connection per tunnel: three curl runs, three tunnels.
    assert!(lab.api.connections() <= 4, "{}", lab.api.connections());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_body_is_enforced_for_content_length_and_chunked_bodies() {
    let lab = lab("anonymous").await;
    let small = "a".repeat(100);
    let out = lab.curl(&["--http1.1", "--data-binary", &small, &lab.url("api.test", "/sha256")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 200 OK", "{out:?}");
    assert!(body(&out).ends_with("bytes=100\n"), "{out:?}");
    let big = lab.proxy.dir.write("big", "b".repeat(4000));
    let at = format!("@{}", big.display());
    let out = lab.curl(&["--http1.1", "--data-binary", &at, &lab.url("api.test", "/sha256")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 413 Payload Too Large", "{out:?}");
    assert!(out.stdout.contains("reason=body_too_large"), "{out:?}");
    let out = lab
        .curl(&["--http1.1", "-H", "Transfer-Encoding: chunked", "--data-binary", &at, &lab.url("api.test", "/sha256")])
        .await;
    assert_eq!(status_line(&out), "HTTP/1.1 413 Payload Too Large", "{out:?}");
    // Over HTTP/2 with a declared length too.
    let out = lab.curl(&["--http2", "--data-binary", &at, &lab.url("api.test", "/sha256")]).await;
    assert!(out.stdout.contains("HTTP/2 413"), "{out:?}");
    let records = lab.inspected(4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let records = if records.len() > 4 { records } else { lab.inspected(4).await };
    let reasons: Vec<_> = records.iter().map(|r| r["reason"].as_str().unwrap_or("").to_string()).collect();
    // The chunked body was allowed by its rule and cut when it went over: one line, its refusal (no
    // allow line before it, since the upstream never answered).
    assert_eq!(reasons, ["request_allowed", "body_too_large", "body_too_large", "body_too_large"]);
}

/// CONNECTs `authority` through the proxy by hand and completes TLS trusting `roots`, sending `sni`.
async fn tunnel_tls(
    proxy: std::net::SocketAddr,
    authority: &str,
    sni: &str,
    roots: &std::path::Path,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(proxy).await.expect("connect proxy");
    tls_after_connect(tcp, authority, sni, roots, alpn).await
}

/// Sends a CONNECT for `authority` on `tcp` (which may have carried other requests) and completes TLS
/// inside the tunnel trusting `roots`.
async fn tls_after_connect(
    mut tcp: TcpStream,
    authority: &str,
    sni: &str,
    roots: &std::path::Path,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.expect("send");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = within(STEP, "CONNECT answer", tcp.read(&mut byte)).await.expect("read");
        assert_eq!(n, 1, "proxy closed: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head);
    }
    let mut store = rustls::RootCertStore::empty();
    let text = std::fs::read_to_string(roots).expect("roots");
    for block in pem::parse_many(&text).expect("pem") {
        store.add(rustls::pki_types::CertificateDer::from(block.into_contents())).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    within(STEP, "TLS", connector.connect(name, tcp)).await.map_err(|e| format!("TLS: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fronting_is_refused_by_host_header_authority_and_sni() {
    let lab = lab("anonymous").await;
    // Host: evil inside a tunnel to api.test (HTTP/1.1).
    let out = lab.curl(&["--http1.1", "-H", "Host: evil.test", &lab.url("api.test", "/ok/x")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 421 Misdirected Request", "{out:?}");
    assert!(
        out.stdout.contains("reason=host_mismatch")
            || out.stdout.contains("x-sluice-decision: deny; reason=host_mismatch"),
        "{out:?}"
    );
    assert!(body(&out).contains("names \"evil.test\""), "{out:?}");
    // HTTP/2: the first request's :authority is the CONNECT host and passes; a second on the same
    // connection names another authority and is refused; a third for the right one passes again.
    let authority = format!("api.test:{}", lab.port);
    let tls = tunnel_tls(lab.proxy.addr, &authority, "api.test", &lab.ca, &[b"h2"]).await.expect("tunnel");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut ask = async |uri: String| {
        let req = Request::get(uri).body(Empty::<Bytes>::new()).expect("request");
        let resp = within(STEP, "h2 request", sender.send_request(req)).await.expect("h2 response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let (status, text) = ask(format!("https://{authority}/ok/h2")).await;
    assert_eq!((status, text.as_str()), (200, "hello from api /ok/h2\n"));
    let (status, text) = ask(format!("https://evil.test:{}/ok/h2", lab.port)).await;
    assert_eq!(status, 421, "{text}");
    assert!(text.contains(":authority names \"evil.test:"), "{text}");
    let (status, _) = ask(format!("https://{authority}/ok/again")).await;
    assert_eq!(status, 200);
    // An SNI that names another host than the CONNECT: no leaf, no tunnel.
    let refused = tunnel_tls(lab.proxy.addr, &authority, "evil.test", &lab.ca, &[]).await;
    assert!(refused.is_err(), "the handshake must fail");
    let records = lab.inspected(5).await;
    let got: Vec<_> =
        records.iter().map(|r| (r["reason"].as_str().unwrap_or("").to_string(), r["status"].as_u64())).collect();
    assert_eq!(
        got,
        [
            ("host_mismatch".to_string(), Some(421)),
            ("request_allowed".to_string(), None),
            ("host_mismatch".to_string(), Some(421)),
            ("request_allowed".to_string(), None),
            ("host_mismatch".to_string(), Some(421)),
        ]
    );
    assert!(records[4]["detail"].as_str().unwrap_or("").contains("SNI names \"evil.test\""), "{}", records[4]);
    let closed: Vec<Value> = lab.all_records().into_iter().filter(|v| v["event"] == "tunnel_closed").collect();
    assert!(closed.iter().any(|v| v["end"] == "sni_mismatch"), "{closed:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upstream_certificates_are_refused_with_the_reason() {
    let lab = lab("anonymous").await;
    let cases = [
        ("expired.test", lab.bad[0], "expired"),
        ("wrong.test", lab.bad[1], "name mismatch"),
        ("unknown.test", lab.bad[2], "unknown issuer"),
    ];
    for (host, port, why) in cases {
        let r = raw_exchange(
            lab.proxy.addr,
            format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status_line, "HTTP/1.1 502 Bad Gateway", "{host}: {r:#?}");
        assert_eq!(r.header("x-sluice-decision"), Some("deny; reason=upstream_cert_invalid; policy=lab"), "{host}");
        assert!(r.body.contains(why), "{host}: {}", r.body);
    }
    // A good upstream's own certificate verifies (the public CA is an extra root) and HTTP/2 is
    // negotiated on the upstream leg when the upstream offers it.
    let out = curl(
        &[
            "-x",
            &lab.proxy.url(),
            "--cacert",
            lab.ca.to_str().unwrap(),
            "--http1.1",
            &format!("https://h2.test:{}/v", lab.h2),
        ],
        LIMIT,
    )
    .await;
    assert_eq!(out.stdout, format!("HTTP/2.0 /v host=h2.test:{}\n", lab.h2), "{out:?}");
    let out = curl(
        &[
            "-x",
            &lab.proxy.url(),
            "--cacert",
            lab.ca.to_str().unwrap(),
            "--http2",
            &format!("https://h2.test:{}/w", lab.h2),
        ],
        LIMIT,
    )
    .await;
    assert_eq!(out.stdout, format!("HTTP/2.0 /w host=h2.test:{}\n", lab.h2), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_hosts_are_never_terminated_and_plain_bytes_are_not_tls() {
    let lab = lab("anonymous").await;
    // pass.test has request rules too, but tls_passthrough wins: the client sees the upstream's own
    // certificate, which only the public CA verifies.
    let url = format!("https://pass.test:{}/anything", lab.port);
    let out = curl(&["-x", &lab.proxy.url(), "--cacert", lab.public.to_str().unwrap(), &url], LIMIT).await;
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), "hello from api /anything\n"), "{out:?}");
    let out = curl(&["-x", &lab.proxy.url(), "--cacert", lab.ca.to_str().unwrap(), &url], LIMIT).await;
    assert_ne!(out.code, Some(0), "sluice's CA must not verify a passthrough tunnel: {out:?}");
    // A terminated host, the other way round.
    let url = lab.url("api.test", "/ok/p");
    let out = curl(&["-x", &lab.proxy.url(), "--cacert", lab.public.to_str().unwrap(), &url], LIMIT).await;
    assert_ne!(out.code, Some(0), "{out:?}");
    // Plain HTTP inside a tunnel that is terminated: refused as not TLS, recorded.
    let mut c = RawClient::connect(lab.proxy.addr).await;
    c.send(format!("CONNECT api.test:{0} HTTP/1.1\r\nHost: api.test:{0}\r\n\r\n", lab.port).as_bytes()).await;
    assert_eq!(c.response().await.expect("200").status_line, "HTTP/1.1 200 OK");
    c.send(b"GET /ok/x HTTP/1.1\r\nHost: api.test\r\n\r\n").await;
    let r = c.response().await.expect("refusal");
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request", "{r:#?}");
    assert_eq!(r.header("x-sluice-decision"), Some("deny; reason=not_tls; policy=lab"));
    let records = lab.inspected(1).await;
    assert_eq!(records.iter().map(|r| r["reason"].as_str().unwrap_or("")).collect::<Vec<_>>(), ["not_tls"]);
    assert!(lab.all_records().iter().all(|r| r["host"] != "pass.test" || r["inspected"].is_null()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_python_and_node_work_with_only_what_sluice_env_prints() {
    let lab = lab("credential").await;
    let work = TempDir::new("terminate-env");
    let key = work.write("key", KEY);
    let addr = lab.proxy.addr.to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["env", "--session", "env-1", "--policy", "lab", "--proxy", &addr, "--key-file", key.to_str().unwrap()])
        .args(["--ca-cert", lab.ca.to_str().unwrap(), "--ca-bundle", lab.ca.to_str().unwrap()])
        .output()
        .expect("sluice env");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = work.write("env.sh", &out.stdout);
    let url = |p: &str| lab.url("api.test", p);
    let (code, out, err) = run_sourced(&script, &format!("curl -sS {}", url("/ok/curl"))).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from api /ok/curl\n"), "{err}");
    let py = format!(
        "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"{}\").read().decode(), end=\"\")'",
        url("/ok/python")
    );
    let (code, out, err) = run_sourced(&script, &py).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from api /ok/python\n"), "{err}");
    // Python sees the refusal as an HTTP error with sluice's status.
    let py = format!(
        "python3 -c 'import urllib.request, urllib.error\ntry:\n  urllib.request.urlopen(\"{}\")\nexcept urllib.error.HTTPError as e:\n  print(e.code, e.headers[\"x-sluice-decision\"])'",
        url("/nope")
    );
    let (code, out, err) = run_sourced(&script, &py).await;
    assert_eq!((code, out.trim()), (Some(0), "403 deny; reason=no_request_rule; policy=lab"), "{err}");
    // Node 20 has no proxy support of its own: the script opens the CONNECT from HTTPS_PROXY, and
    // node's TLS trusts sluice through NODE_EXTRA_CA_CERTS.
    let node = format!(
        r#"node -e '
const http = require("http");
const p = new URL(process.env.HTTPS_PROXY), t = new URL("{}");
const auth = "Basic " + Buffer.from(decodeURIComponent(p.username) + ":" + decodeURIComponent(p.password)).toString("base64");
http.request({{host: p.hostname, port: p.port, method: "CONNECT", path: t.host, headers: {{"proxy-authorization": auth}}}})
  .on("connect", (res, socket) => {{
    const tls = require("tls").connect({{socket, servername: t.hostname}}, () => {{
      tls.write("GET " + t.pathname + " HTTP/1.1\r\nHost: " + t.host + "\r\nConnection: close\r\n\r\n");
    }});
    let s = ""; tls.on("data", d => s += d);
    tls.on("end", () => {{ const [head, body] = s.split("\r\n\r\n"); process.stdout.write(head.split(" ")[1] + " " + body); }});
    tls.on("error", e => {{ console.error(e); process.exit(3); }});
  }}).on("error", e => {{ console.error(e); process.exit(2); }}).end();
'"#,
        url("/ok/node")
    );
    let (code, out, err) = run_sourced(&script, &node).await;
    assert_eq!((code, out.as_str()), (Some(0), "200 hello from api /ok/node\n"), "{err}");
    let records = lab.inspected(4).await;
    let got: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            (
                r["session"].as_str().unwrap_or("").to_string(),
                r["method"].as_str().unwrap_or("").to_string(),
                r["path"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want = ["/ok/curl", "/ok/python", "/nope", "/ok/node"]
        .map(|p| ("env-1".to_string(), "GET".to_string(), p.to_string()));
    assert_eq!(got, want);
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clones_over_https_through_a_terminated_tunnel_and_its_push_is_refused() {
    let dir = TempDir::new("terminate-git");
    let base = dir.path().to_path_buf();
    for d in ["root", "home", "seed", "work"] {
        std::fs::create_dir_all(base.join(d)).expect("mkdir");
    }
    let bare = base.join("root/repo.git");
    git(&base, &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()]);
    git(&bare, &["config", "http.receivepack", "true"]);
    let seed = base.join("seed");
    git(&seed, &["init", "-q", "-b", "main"]);
    std::fs::write(seed.join("README"), "through sluice\n").expect("write");
    git(&seed, &["add", "README"]);
    git(&seed, &["commit", "-q", "-m", "one"]);
    git(&seed, &["push", "-q", bare.to_str().unwrap(), "main"]);
    let public = PublicCa::new("public");
    let cert = public.leaf(&["git.test"], false, &[b"http/1.1"]);
    let state = Arc::new(cgi::UpstreamState { root: base.join("root"), home: base.join("home"), ..Default::default() });
    let up = cgi::spawn_tls_upstream(state.clone(), tokio_rustls::TlsAcceptor::from(cert.server_config.clone())).await;
    let port = up.port();
    let files = sluice::inspect::ca::init(&base.join("ca")).expect("ca init");
    let public_pem = dir.write("public.pem", &public.pem);
    let key = dir.write("key", KEY);
    let config = format!(
        "[egress]\npolicy = \"lab\"\n[auth]\nanonymous = false\nkey_file = {key:?}\n[resolver]\nhosts = {{ \"git.test\" = [\"127.0.0.1\"] }}\n\
         [inspect]\nca_cert = {:?}\nca_key = {:?}\nextra_roots = [{public_pem:?}]\n",
        files.cert, files.key
    );
    let policy = format!(
        "version = 1\nname = \"lab\"\nlevel = \"custom\"\nallow = [\"git.test:{port}\"]\nallow_ips = [\"127.0.0.0/8\"]\n\n\
         [[requests]]\nhosts = [\"git.test\"]\nmethods = [\"GET\"]\npaths = [\"/*/info/refs\"]\naction = \"allow\"\n\n\
         [[requests]]\nhosts = [\"git.test\"]\nmethods = [\"POST\"]\npaths = [\"/*/git-upload-pack\"]\naction = \"allow\"\n"
    );
    let ca = files.cert.clone();
    let proxy = Proxy::start_recorded(dir, &config, &[("lab.toml", &policy)]).await;
    let work = base.join("work");
    std::fs::write(work.join("key"), KEY).expect("key");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["env", "--session", "git-1", "--policy", "lab", "--proxy", &proxy.addr.to_string()])
        .args(["--key-file", work.join("key").to_str().unwrap()])
        .args(["--ca-cert", ca.to_str().unwrap(), "--ca-bundle", ca.to_str().unwrap()])
        .output()
        .expect("sluice env");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = work.join("env.sh");
    std::fs::write(&script, &out.stdout).expect("script");
    let clone = format!(
        "cd {} && HOME={} GIT_CONFIG_NOSYSTEM=1 git clone -q https://git.test:{port}/repo.git copy && cat copy/README",
        work.display(),
        work.display()
    );
    let (code, out, err) = run_sourced(&script, &clone).await;
    assert_eq!((code, out.as_str()), (Some(0), "through sluice\n"), "{err}");
    // A push is not among the rules: refused inside the tunnel, and the upstream never sees it.
    let push = format!(
        "cd {}/copy && HOME={} GIT_CONFIG_NOSYSTEM=1 git -c user.name=t -c user.email=t@example.invalid commit -q --allow-empty -m two && HOME={} git push -q origin main",
        work.display(),
        work.display(),
        work.display()
    );
    let (code, _, err) = run_sourced(&script, &push).await;
    assert_ne!(code, Some(0), "the push must fail");
    assert!(err.contains("403"), "{err}");
    assert_eq!(state.by_path.lock().unwrap().keys().filter(|k| k.contains("receive-pack")).count(), 0);
    let records: Vec<Value> = proxy
        .records()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "decision" && v["inspected"] == true)
        .collect();
    let got: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (r["method"].as_str().unwrap_or(""), r["path"].as_str().unwrap_or(""), r["reason"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(got[0], ("GET", "/repo.git/info/refs", "request_allowed"), "{got:?}");
    assert!(got.contains(&("POST", "/repo.git/git-upload-pack", "request_allowed")), "{got:?}");
    assert!(got.contains(&("POST", "/repo.git/git-receive-pack", "no_request_rule")), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_passes_once_decided_and_then_carries_bytes_both_ways() {
    let lab = lab("anonymous").await;
    let authority = format!("ws.test:{}", lab.ws);
    let mut tls = tunnel_tls(lab.proxy.addr, &authority, "ws.test", &lab.ca, &[b"http/1.1"]).await.expect("tunnel");
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.expect("send");
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = within(STEP, "101", tls.read(&mut byte)).await.expect("read");
        assert_eq!(n, 1, "closed: {}", String::from_utf8_lossy(&got));
        got.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 101"), "{text}");
    assert!(text.contains("upgrade: websocket"), "{text}");
    tls.write_all(b"ping through sluice").await.expect("send");
    let mut echo = vec![0u8; 19];
    within(STEP, "echo", tls.read_exact(&mut echo)).await.expect("echo");
    assert_eq!(&echo, b"ping through sluice");
    let records = lab.inspected(1).await;
    assert_eq!(brief(&records[0]), b("GET", "/ws", "allow", "request_allowed", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_serves_what_request_rules_would_refuse_and_says_so() {
    let public = PublicCa::new("public");
    let api = Upstream::tls("api", &public.leaf(&["api.test"], false, &[])).await;
    let plain = Upstream::plain("plain").await;
    let dir = TempDir::new("terminate-report");
    let files = sluice::inspect::ca::init(&dir.path().join("ca")).expect("ca init");
    let public_pem = dir.write("public.pem", &public.pem);
    let config = format!(
        "[egress]\npolicy = \"lab\"\n[resolver]\nhosts = {{ \"api.test\" = [\"127.0.0.1\"], \"plain.test\" = [\"127.0.0.1\"] }}\n\
         [inspect]\nca_cert = {:?}\nca_key = {:?}\nextra_roots = [{public_pem:?}]\n",
        files.cert, files.key
    );
    let policy = format!(
        "version = 1\nname = \"lab\"\nlevel = \"custom\"\nmode = \"report\"\nallow = [\"api.test:{}\", \"plain.test:{}\"]\n\
         allow_ips = [\"127.0.0.0/8\"]\n[[requests]]\nhosts = [\"api.test\", \"plain.test\"]\nmethods = [\"GET\"]\n\
         paths = [\"/ok/**\"]\naction = \"allow\"\n",
        api.port(),
        plain.port()
    );
    let ca = files.cert.clone();
    let proxy = Proxy::start_recorded(dir, &config, &[("lab.toml", &policy)]).await;
    let url = format!("https://api.test:{}/other", api.port());
    let out = curl(&["-x", &proxy.url(), "--cacert", ca.to_str().unwrap(), "-i", &url], LIMIT).await;
    assert!(out.stdout.contains("hello from api /other"), "{out:?}");
    assert!(out.stdout.contains("x-sluice-decision: allow; would_deny=no_request_rule; policy=lab"), "{out:?}");
    let url = format!("http://plain.test:{}/other", plain.port());
    let out = curl(&["-x", &proxy.url(), "-i", &url], LIMIT).await;
    assert!(out.stdout.contains("hello from plain /other"), "{out:?}");
    assert!(out.stdout.contains("x-sluice-decision: allow; would_deny=no_request_rule; policy=lab"), "{out:?}");
    let would: Vec<Value> = proxy
        .records()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "decision" && v["would_deny"] == "no_request_rule")
        .collect();
    assert_eq!(would.len(), 2, "{would:#?}");
    assert_eq!(would[0]["inspected"], true);
    assert!(would[1]["inspected"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_all_terminates_an_ip_destination_whose_client_sends_no_sni() {
    let public = PublicCa::new("public");
    let api = Upstream::tls("ip", &public.leaf(&["127.0.0.1"], false, &[])).await;
    let dir = TempDir::new("terminate-ip");
    let files = sluice::inspect::ca::init(&dir.path().join("ca")).expect("ca init");
    let public_pem = dir.write("public.pem", &public.pem);
    let config = format!(
        "[egress]\npolicy = \"lab\"\n[inspect]\nca_cert = {:?}\nca_key = {:?}\nextra_roots = [{public_pem:?}]\n",
        files.cert, files.key
    );
    let policy = format!(
        "version = 1\nname = \"lab\"\nlevel = \"custom\"\ninspect = \"all\"\nallow_ips = [\"127.0.0.1\"]\nports = [{}]\n",
        api.port()
    );
    let ca = files.cert.clone();
    let proxy = Proxy::start_recorded(dir, &config, &[("lab.toml", &policy)]).await;
    let url = format!("https://127.0.0.1:{}/ip", api.port());
    let out = curl(&["-x", &proxy.url(), "--cacert", ca.to_str().unwrap(), &url], LIMIT).await;
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), "hello from ip /ip\n"), "{out:?}");
    let inner: Vec<Value> = proxy
        .records()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "decision" && v["inspected"] == true)
        .collect();
    assert_eq!(inner.len(), 1, "{inner:#?}");
    assert_eq!((inner[0]["host"].as_str(), inner[0]["path"].as_str()), (Some("127.0.0.1"), Some("/ip")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_after_another_request_on_the_connection_is_terminated_too() {
    let lab = lab("anonymous").await;
    // A refused plain-HTTP request first: the connection stays open and hyper serves the CONNECT after it.
    let mut c = RawClient::connect(lab.proxy.addr).await;
    c.send(b"GET http://other.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n").await;
    let r = c.response().await.expect("refusal");
    assert_eq!(r.status_line, "HTTP/1.1 403 Forbidden", "{r:#?}");
    let authority = format!("api.test:{}", lab.port);
    let mut tls = tls_after_connect(c.stream, &authority, "api.test", &lab.ca, &[b"http/1.1"]).await.expect("tunnel");
    let req = format!("GET /ok/second HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    let _ = within(STEP, "answer", tls.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.ends_with("hello from api /ok/second\n"), "{text}");
    let records = lab.inspected(1).await;
    assert_eq!(brief(&records[0]), b("GET", "/ok/second", "allow", "request_allowed", 0));
}

/// Sends a WebSocket upgrade on `tls` and reads the answer's head.
async fn ws_upgrade(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, authority: &str, extra: &str) -> String {
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    tls.write_all(head.as_bytes()).await.expect("send");
    read_head(tls).await
}

/// The head of the next answer on `tls`, lower-cased.
async fn read_head(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = within(STEP, "answer head", tls.read(&mut byte)).await.expect("read");
        assert_eq!(n, 1, "closed: {}", String::from_utf8_lossy(&got));
        got.push(byte[0]);
    }
    String::from_utf8_lossy(&got).to_ascii_lowercase()
}

/// The head of the answer to a CONNECT for `authority` on a new connection.
async fn connect_answer(proxy: std::net::SocketAddr, authority: &str) -> String {
    let mut c = RawClient::connect(proxy).await;
    c.send(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await;
    c.response().await.map(|r| r.status_line).unwrap_or_default()
}

/// An upgraded connection is the tunnel: it keeps the session's place under `max_tunnels` while it
/// is open (a second CONNECT is refused `429`), the idle timeout ends it, and then the place is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_holds_its_tunnel_place_until_it_idles_out() {
    let lab = lab_with("anonymous", "[limits]\nmax_tunnels = 1\n", "idle_timeout = 2\n").await;
    let authority = format!("ws.test:{}", lab.ws);
    let mut tls = tunnel_tls(lab.proxy.addr, &authority, "ws.test", &lab.ca, &[b"http/1.1"]).await.expect("tunnel");
    let text = ws_upgrade(&mut tls, &authority, "").await;
    assert!(text.starts_with("http/1.1 101"), "{text}");
    tls.write_all(b"ping").await.expect("send");
    let mut echo = [0u8; 4];
    within(STEP, "echo", tls.read_exact(&mut echo)).await.expect("echo");
    assert_eq!(&echo, b"ping");
    // hyper is done with the connection; the relay still holds the tunnel's place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = connect_answer(lab.proxy.addr, &format!("api.test:{}", lab.port)).await;
    assert_eq!(second, "HTTP/1.1 429 Too Many Requests");
    // Quiet for the idle timeout: the relay and the tunnel end.
    let mut rest = Vec::new();
    let _ = within(STEP, "idle close", tls.read_to_end(&mut rest)).await;
    let closed = {
        let mut found = None;
        for _ in 0..200 {
            found = lab.all_records().into_iter().find(|v| v["event"] == "tunnel_closed");
            if found.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        found.expect("the tunnel's closing record")
    };
    assert_eq!(closed["end"], "idle_timeout", "{closed}");
    assert!(closed["bytes_up"].as_u64().unwrap_or(0) > 0, "{closed}");
    let third = connect_answer(lab.proxy.addr, &format!("api.test:{}", lab.port)).await;
    assert_eq!(third, "HTTP/1.1 200 OK");
}

/// `Upgrade: h2c` (h2c smuggling: the later HTTP/2 streams would skip the fronting guard and the
/// rules) is refused `403 upgrade_refused` and never reaches the upstream; so is a WebSocket upgrade
/// without its handshake headers. A real WebSocket upgrade still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_upgrades_pass_and_h2c_never_reaches_the_upstream() {
    let lab = lab("anonymous").await;
    let authority = format!("api.test:{}", lab.port);
    for (upgrade, extra) in [
        ("h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
        ("websocket, h2c", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"),
        ("websocket", ""),
    ] {
        let mut tls =
            tunnel_tls(lab.proxy.addr, &authority, "api.test", &lab.ca, &[b"http/1.1"]).await.expect("tunnel");
        let head = format!(
            "GET /ok/x HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n{extra}\r\n"
        );
        tls.write_all(head.as_bytes()).await.expect("send");
        let text = read_head(&mut tls).await;
        assert!(text.starts_with("http/1.1 403"), "{upgrade}: {text}");
        assert!(text.contains("reason=upgrade_refused"), "{upgrade}: {text}");
    }
    assert_eq!(lab.api.requests(), 0, "the upstream saw a refused upgrade");
    let records = lab.inspected(3).await;
    assert!(records.iter().all(|r| r["reason"] == "upgrade_refused" && r["status"] == 403), "{records:#?}");
    let authority = format!("ws.test:{}", lab.ws);
    let mut tls = tunnel_tls(lab.proxy.addr, &authority, "ws.test", &lab.ca, &[b"http/1.1"]).await.expect("tunnel");
    let text = ws_upgrade(&mut tls, &authority, "").await;
    assert!(text.starts_with("http/1.1 101"), "{text}");
}

/// An inner request of a session whose upload quota is spent is answered `429 quota_exceeded` before
/// anything goes upstream, and the tunnel ends with `end = quota_exceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_request_after_the_quota_is_spent_is_refused_429() {
    let lab = lab_with("anonymous", "[limits]\nupload_quota = \"1KiB/hour\"\n", "").await;
    let authority = format!("api.test:{}", lab.port);
    let mut tls = tunnel_tls(lab.proxy.addr, &authority, "api.test", &lab.ca, &[b"http/1.1"]).await.expect("tunnel");
    let body = vec![b'x'; 1024];
    let head = format!("POST /sha256 HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {}\r\n\r\n", body.len());
    tls.write_all(head.as_bytes()).await.expect("send");
    tls.write_all(&body).await.expect("send body");
    let text = read_head(&mut tls).await;
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let length: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a content-length");
    let mut rest = vec![0u8; length];
    within(STEP, "sha body", tls.read_exact(&mut rest)).await.expect("body");
    let served = lab.api.requests();
    let req = format!("GET /ok/after HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.expect("send");
    let text = read_head(&mut tls).await;
    assert!(text.starts_with("http/1.1 429"), "{text}");
    assert!(text.contains("reason=quota_exceeded"), "{text}");
    assert_eq!(lab.api.requests(), served, "the refused request reached the upstream");
    let mut rest = Vec::new();
    let _ = within(STEP, "close", tls.read_to_end(&mut rest)).await;
    let mut closed = None;
    for _ in 0..200 {
        closed = lab.all_records().into_iter().find(|v| v["event"] == "tunnel_closed");
        if closed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed.expect("closing record")["end"], "quota_exceeded");
}

/// Spellings servers decode (`%2F`, `;params`, `\\`, `..;`) are the denied path to a deny rule, and
/// methods are compared without case, through a real client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_spellings_of_a_denied_path_are_refused_inside_the_tunnel() {
    let lab = lab("anonymous").await;
    for path in ["/ok/secret%2Fx", "/ok/secret;x/y", "/ok/x/..;/secret/y", "/ok/secret%5Cx"] {
        let out = lab.curl(&["--http1.1", "--path-as-is", &lab.url("api.test", path)]).await;
        assert_eq!(status_line(&out), "HTTP/1.1 403 Forbidden", "{path}: {out:?}");
        assert!(out.stdout.contains("reason=request_denied"), "{path}: {out:?}");
    }
    assert_eq!(lab.api.requests(), 0, "a denied spelling reached the upstream");
    // `get` is GET to the rules (and the upstream answers it).
    let out = lab.curl(&["--http1.1", "-X", "get", &lab.url("api.test", "/ok/lower")]).await;
    assert_ne!(status_line(&out), "HTTP/1.1 403 Forbidden", "{out:?}");
    assert!(!out.stdout.contains("no_request_rule"), "{out:?}");
}

/// An HTTP/2 upstream connection serves every request of the tunnel: three sequential requests (the
/// client speaks HTTP/1.1 to sluice) take the one connection verified before the `200`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_connection_is_reused_for_the_tunnels_requests() {
    let lab = lab("anonymous").await;
    let urls: Vec<String> = (1..=3).map(|i| format!("https://h2.test:{}/n{i}", lab.h2)).collect();
    let out = lab.curl(&["--http1.1", &urls[0], &urls[1], &urls[2]]).await;
    for i in 1..=3 {
        assert!(out.stdout.contains(&format!("HTTP/2.0 /n{i} host=h2.test:")), "{out:?}");
    }
    let tunnels = lab.all_records().iter().filter(|v| v["event"] == "decision" && v["method"] == "CONNECT").count();
    assert_eq!(tunnels, 1, "curl used one tunnel");
    assert_eq!(lab.h2_accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "one upstream connection");
}

/// An HTTP/1.1 upstream that answers each request after `delay`; counts connections accepted and the
/// most requests it held at once.
async fn slow_upstream(
    cert: &TestCert,
    delay: Duration,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config.clone());
    let (accepted, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, m) = (accepted.clone(), most.clone());
    let now = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, SeqCst);
            let (acceptor, m, now) = (acceptor.clone(), m.clone(), now.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) = tokio::time::timeout(STEP, acceptor.accept(stream)).await else { return };
                let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let (m, now) = (m.clone(), now.clone());
                    async move {
                        let held = now.fetch_add(1, SeqCst) + 1;
                        m.fetch_max(held, SeqCst);
                        tokio::time::sleep(delay).await;
                        now.fetch_sub(1, SeqCst);
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"slow\n"))))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                let _ = conn.await;
            });
        }
    });
    (addr, accepted, most)
}

/// One tunnel holds at most 8 upstream connections: 20 concurrent HTTP/2 streams to an HTTP/1.1
/// upstream all get their answer, over no more than 8 connections (the rest wait for one to free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnels_upstream_connections_are_capped() {
    use std::sync::atomic::Ordering::SeqCst;
    let public = PublicCa::new("public");
    let (addr, accepted, most) =
        slow_upstream(&public.leaf(&["slow.test"], false, &[b"http/1.1"]), Duration::from_millis(400)).await;
    let dir = TempDir::new("terminate-cap");
    let files = sluice::inspect::ca::init(&dir.path().join("ca")).expect("ca init");
    let public_pem = dir.write("public.pem", &public.pem);
    let config = format!(
        "[egress]\npolicy = \"lab\"\n[resolver]\nhosts = {{ \"slow.test\" = [\"127.0.0.1\"] }}\n\
         [inspect]\nca_cert = {:?}\nca_key = {:?}\nextra_roots = [{public_pem:?}]\n",
        files.cert, files.key
    );
    let policy = format!(
        "version = 1\nname = \"lab\"\nlevel = \"custom\"\ninspect = \"all\"\nallow = [\"slow.test:{}\"]\nallow_ips = [\"127.0.0.0/8\"]\n",
        addr.port()
    );
    let ca = files.cert.clone();
    let proxy = Proxy::start_recorded(dir, &config, &[("lab.toml", &policy)]).await;
    let authority = format!("slow.test:{}", addr.port());
    let tls = tunnel_tls(proxy.addr, &authority, "slow.test", &ca, &[b"h2"]).await.expect("tunnel");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut asks = Vec::new();
    for i in 0..20 {
        let mut sender = sender.clone();
        let uri = format!("https://{authority}/c{i}");
        asks.push(tokio::spawn(async move {
            let req = Request::get(uri).body(Empty::<Bytes>::new()).expect("request");
            let resp = within(STEP, "h2 request", sender.send_request(req)).await.expect("h2 response");
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, body)
        }));
    }
    for ask in asks {
        let (status, body) = ask.await.expect("task");
        assert_eq!((status, &body[..]), (200, &b"slow\n"[..]));
    }
    let (accepted, most) = (accepted.load(SeqCst), most.load(SeqCst));
    assert!(accepted <= 8, "{accepted} upstream connections for one tunnel");
    assert!((2..=8).contains(&most), "the upstream held {most} requests at once");
}

/// A CONNECT inside a terminated tunnel (to the same host or another) is answered `405` and never
/// forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_inside_a_terminated_tunnel_is_405() {
    let lab = lab("anonymous").await;
    let authority = format!("api.test:{}", lab.port);
    for target in [authority.clone(), "evil.test:443".to_string()] {
        let mut tls =
            tunnel_tls(lab.proxy.addr, &authority, "api.test", &lab.ca, &[b"http/1.1"]).await.expect("tunnel");
        let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        tls.write_all(head.as_bytes()).await.expect("send");
        let text = read_head(&mut tls).await;
        assert!(text.starts_with("http/1.1 405"), "{target}: {text}");
        assert!(text.contains("reason=method_not_allowed"), "{target}: {text}");
    }
    assert_eq!(lab.api.requests(), 0);
    let records = lab.inspected(2).await;
    assert!(records.iter().all(|r| r["method"] == "CONNECT" && r["status"] == 405), "{records:#?}");
}

/// `te: trailers` (gRPC) passes when both legs are HTTP/2, and no other TE ever does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_trailers_passes_when_both_legs_are_h2() {
    let lab = lab("anonymous").await;
    let authority = format!("h2.test:{}", lab.h2);
    let tls = tunnel_tls(lab.proxy.addr, &authority, "h2.test", &lab.ca, &[b"h2"]).await.expect("tunnel");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::get(format!("https://{authority}/te")).header("te", "trailers").body(Empty::<Bytes>::new());
    let resp = within(STEP, "h2 request", sender.send_request(req.expect("request"))).await.expect("response");
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&got[..], b"te=trailers\n");
    // An HTTP/1.1 client's TE is hop-by-hop: stripped.
    let out = lab.curl(&["--http1.1", "-H", "TE: trailers", &format!("https://{authority}/te")]).await;
    assert_eq!(body(&out), "te=\n", "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_inside_a_terminated_tunnel_count_against_the_session_rate() {
    let public = PublicCa::new("public");
    let api = Upstream::tls("api", &public.leaf(&["api.test"], false, &[])).await;
    let dir = TempDir::new("terminate-rate");
    let files = sluice::inspect::ca::init(&dir.path().join("ca")).expect("ca init");
    let public_pem = dir.write("public.pem", &public.pem);
    let config = format!(
        "[egress]\npolicy = \"lab\"\n[resolver]\nhosts = {{ \"api.test\" = [\"127.0.0.1\"] }}\n\
         [inspect]\nca_cert = {:?}\nca_key = {:?}\nextra_roots = [{public_pem:?}]\n",
        files.cert, files.key
    );
    // A burst of 2 at 1 per 1000 s: the CONNECT takes one, the first inner request the other.
    let policy = format!(
        "version = 1\nname = \"lab\"\nlevel = \"custom\"\nallow = [\"api.test:{}\"]\nallow_ips = [\"127.0.0.0/8\"]\n\
         [limits]\nrequests_per_second = 0.001\nburst = 2\n\
         [[requests]]\nhosts = [\"api.test\"]\nmethods = [\"GET\"]\naction = \"allow\"\n",
        api.port()
    );
    let ca = files.cert.clone();
    let proxy = Proxy::start_recorded(dir, &config, &[("lab.toml", &policy)]).await;
    let authority = format!("api.test:{}", api.port());
    let mut tls = tunnel_tls(proxy.addr, &authority, "api.test", &ca, &[b"http/1.1"]).await.expect("tunnel");
    let mut answers = Vec::new();
    for path in ["/one", "/two"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        tls.write_all(req.as_bytes()).await.expect("send");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = within(STEP, "answer", tls.read(&mut byte)).await.expect("read");
            assert_eq!(n, 1, "closed: {}", String::from_utf8_lossy(&head));
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        within(STEP, "body", tls.read_exact(&mut body)).await.expect("body");
        answers.push(head);
    }
    assert!(answers[0].starts_with("HTTP/1.1 200"), "{}", answers[0]);
    assert!(answers[1].starts_with("HTTP/1.1 429"), "{}", answers[1]);
    assert!(answers[1].to_ascii_lowercase().contains("retry-after:"), "{}", answers[1]);
    assert_eq!(api.requests(), 1, "the refused request never went upstream");
}
