//! `[egress] check_sni` on tunnels that are not terminated: a ClientHello naming another host than
//! the CONNECT target is refused with a TLS alert before any byte reaches the upstream, and so is a
//! hello without SNI in a tunnel to a name and a first TLS record that is not a handshake; a matching
//! name, other protocols and servers that speak first pass as before.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(20);

fn config(extra_egress: &str) -> String {
    format!(
        "[egress]\npolicy = \"lab\"\n{extra_egress}\n[resolver]\nhosts = {{ \"front.test\" = [\"127.0.0.1\"], \"secure.test\" = [\"127.0.0.1\"] }}\n"
    )
}

fn lab(port: u16) -> String {
    format!(
        "version = 1\nname = \"lab\"\nlevel = \"custom\"\nallow = [\"front.test:{port}\", \"secure.test:{port}\"]\nallow_ips = [\"127.0.0.0/8\"]\n"
    )
}

/// A CONNECT to `host:port` through the proxy, its `200` read: the tunnel's client end.
async fn tunnel(proxy: &Proxy, host: &str, port: u16) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect proxy");
    let head = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("send CONNECT");
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = within(LIMIT, "CONNECT answer", s.read(&mut b)).await.expect("read");
        assert_eq!(n, 1, "proxy closed during the CONNECT answer: {:?}", String::from_utf8_lossy(&got));
        got.push(b[0]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 "), "{:?}", String::from_utf8_lossy(&got));
    s
}

/// A rustls client that asks for `sni` (and trusts `pem`).
fn tls_client(pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let der = pem::parse(pem).expect("pem").into_contents();
    roots.add(rustls::pki_types::CertificateDer::from(der)).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn closing_records(proxy: &Proxy, want: usize) -> Vec<Value> {
    for _ in 0..100 {
        let found: Vec<Value> = proxy
            .records()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "tunnel_closed")
            .collect();
        if found.len() >= want {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {want} closing records: {:?}", proxy.records());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_naming_another_host_is_refused_before_the_upstream_sees_a_byte() {
    let upstream = Recorder::start().await;
    let port = upstream.port();
    let proxy = Proxy::start_recorded(TempDir::new("sni-mismatch"), &config(""), &[("lab.toml", &lab(port))]).await;
    let cert = TestCert::new(&["evil.test"]);
    let s = tunnel(&proxy, "front.test", port).await;
    let name = rustls::pki_types::ServerName::try_from("evil.test").expect("name");
    let err = within(LIMIT, "TLS handshake", tls_client(&cert.pem).connect(name, s)).await.expect_err("refused");
    assert!(err.to_string().contains("AccessDenied"), "{err}");
    assert!(upstream.received().is_empty(), "the hello never went upstream");
    let closed = closing_records(&proxy, 1).await;
    assert_eq!(closed[0]["end"], "sni_mismatch");
    assert_eq!((closed[0]["bytes_up"].as_u64(), closed[0]["bytes_down"].as_u64()), (Some(0), Some(0)));
    assert_eq!(closed[0]["host"], "front.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matching_name_passes_and_so_does_a_mismatch_when_the_check_is_off() {
    let cert = TestCert::new(&["secure.test", "front.test"]);
    let upstream = Upstream::tls("secure", &cert).await;
    let port = upstream.port();
    let proxy = Proxy::start(&config(""), &[("lab.toml", &lab(port))]).await;
    let files = TempDir::new("sni-ca");
    let ca = files.write("ca.pem", &cert.pem);
    let ca = ca.to_str().expect("utf-8");
    let url = format!("https://secure.test:{port}/x");
    let out = curl(&["--proxy", &proxy.url(), "--cacert", ca, &url], LIMIT).await;
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), "hello from secure /x\n"), "{}", out.stderr);
    // Fronting with curl: CONNECT front.test, SNI and Host secure.test.
    let connect_to = format!("secure.test:{port}:front.test:{port}");
    let out = curl(&["--proxy", &proxy.url(), "--cacert", ca, "--connect-to", &connect_to, &url], LIMIT).await;
    assert_eq!(out.code, Some(35), "curl saw the alert: {out:?}");
    assert!(out.stderr.to_ascii_lowercase().contains("access denied"), "{}", out.stderr);
    drop(proxy);

    let proxy = Proxy::start(&config("check_sni = false"), &[("lab.toml", &lab(port))]).await;
    let out = curl(&["--proxy", &proxy.url(), "--cacert", ca, "--connect-to", &connect_to, &url], LIMIT).await;
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), "hello from secure /x\n"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_protocols_and_servers_that_speak_first_pass() {
    let upstream = Recorder::start().await;
    let port = upstream.port();
    let proxy = Proxy::start(&config(""), &[("lab.toml", &lab(port))]).await;
    let mut s = tunnel(&proxy, "front.test", port).await;
    s.write_all(b"SSH-2.0-test\r\n").await.expect("send");
    let mut buf = [0u8; 14];
    within(LIMIT, "echo", s.read_exact(&mut buf)).await.expect("echo");
    assert_eq!(&buf, b"SSH-2.0-test\r\n");

    // A server that greets first: the client sends nothing until it has the banner.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let greeter = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.expect("accept");
        c.write_all(b"220 ready\r\n").await.expect("greet");
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.expect("read");
        c.write_all(&b).await.expect("echo");
    });
    let proxy = Proxy::start(&config(""), &[("lab.toml", &lab(greeter))]).await;
    let mut s = tunnel(&proxy, "front.test", greeter).await;
    let mut banner = [0u8; 11];
    within(Duration::from_secs(5), "banner", s.read_exact(&mut banner)).await.expect("banner");
    assert_eq!(&banner, b"220 ready\r\n");
    s.write_all(b"QUIT").await.expect("send");
    let mut back = [0u8; 4];
    within(LIMIT, "echo", s.read_exact(&mut back)).await.expect("echo");
    assert_eq!(&back, b"QUIT");
    server.await.expect("server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_that_never_completes_is_refused_after_the_header_timeout() {
    let upstream = Recorder::start().await;
    let port = upstream.port();
    let proxy = Proxy::start_recorded(
        TempDir::new("sni-partial"),
        &config("header_timeout = \"1s\""),
        &[("lab.toml", &lab(port))],
    )
    .await;
    let mut s = tunnel(&proxy, "front.test", port).await;
    // A TLS handshake record header, and nothing after it.
    s.write_all(&[22, 3, 1, 0, 200]).await.expect("send");
    let mut got = Vec::new();
    within(LIMIT, "refusal", s.read_to_end(&mut got)).await.expect("read");
    assert_eq!(got, [21, 3, 3, 0, 2, 2, 49], "an access_denied alert, then the close");
    assert!(upstream.received().is_empty());
    assert_eq!(closing_records(&proxy, 1).await[0]["end"], "bad_client_hello");
}

/// "Domainless" fronting: a ClientHello with no SNI in a tunnel to a name is refused (`sni_mismatch`),
/// and so is a first TLS record that is not a handshake (an alert, a change_cipher_spec:
/// `bad_client_hello`); the upstream sees none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_without_sni_and_tls_that_is_not_a_hello_are_refused_for_a_name() {
    let upstream = Recorder::start().await;
    let port = upstream.port();
    let proxy = Proxy::start_recorded(TempDir::new("sni-none"), &config(""), &[("lab.toml", &lab(port))]).await;
    let cert = TestCert::new(&["front.test"]);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(pem::parse(&cert.pem).expect("pem").into_contents()))
        .expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut no_sni = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    no_sni.enable_sni = false;
    let s = tunnel(&proxy, "front.test", port).await;
    let name = rustls::pki_types::ServerName::try_from("front.test").expect("name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(no_sni));
    let err = within(LIMIT, "TLS handshake", connector.connect(name, s)).await.expect_err("refused");
    assert!(err.to_string().contains("AccessDenied"), "{err}");
    // An alert, then a change_cipher_spec, as the first record.
    for first in [&[21u8, 3, 3, 0, 2, 1, 0][..], &[20, 3, 3, 0, 1, 1]] {
        let mut s = tunnel(&proxy, "front.test", port).await;
        s.write_all(first).await.expect("send");
        let mut answer = Vec::new();
        let _ = within(LIMIT, "refusal", s.read_to_end(&mut answer)).await;
        assert_eq!(answer, [21, 3, 3, 0, 2, 2, 49], "an access_denied alert");
    }
    let closed = closing_records(&proxy, 3).await;
    let ends: Vec<&str> = closed.iter().map(|v| v["end"].as_str().unwrap_or("")).collect();
    assert_eq!(ends, ["sni_mismatch", "bad_client_hello", "bad_client_hello"]);
    assert!(upstream.received().is_empty(), "nothing went upstream");
}
