//! Leaf certificates as clients see them: checked with `openssl x509` / `openssl verify`, and served
//! through rustls' certificate resolver to `curl`, which trusts only the sluice CA.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::server::ResolvesServerCert;
use sluice::inspect::leaf::{LEAF_BACKDATE, LEAF_LIFETIME, LEAF_RENEW_BEFORE};
use sluice::inspect::{Ca, LeafCache, TargetCert};
use sluice::policy::Target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fixture {
    dir: tempfile::TempDir,
    ca_pem: PathBuf,
    cache: Arc<LeafCache>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let files = sluice::inspect::ca::init(&dir.path().join("ca")).unwrap();
    let ca = Ca::load(&files.cert, &files.key, SystemTime::now()).unwrap();
    let cache = Arc::new(LeafCache::new(ca, NonZeroUsize::new(100).unwrap()).unwrap());
    Fixture { dir, ca_pem: files.cert, cache }
}

fn target(s: &str) -> Target {
    Target::parse(s).unwrap()
}

/// Writes a leaf's certificate as PEM for openssl.
fn write_leaf(dir: &Path, name: &str, der: &[u8]) -> PathBuf {
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))).unwrap();
    path
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The value lines under an `-ext` heading, joined, with openssl's `keyid:` prefix (older versions) dropped.
fn ext_value(text: &str, heading: &str) -> String {
    let mut lines = text.lines().skip_while(|l| !l.contains(heading)).skip(1);
    let value = lines.next().unwrap_or_default().trim();
    value.strip_prefix("keyid:").unwrap_or(value).to_string()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn leaves_have_their_own_serial_the_right_san_validity_and_authority_key_id() {
    let f = fixture();
    let now = SystemTime::now();
    let ca = f.ca_pem.to_str().unwrap();
    let (ok, ca_text) = openssl(&["x509", "-in", ca, "-noout", "-ext", "subjectKeyIdentifier"]);
    assert!(ok, "{ca_text}");
    let ca_ski = ext_value(&ca_text, "Subject Key Identifier");
    assert_eq!(ca_ski.len(), 20 * 3 - 1, "{ca_text}");

    let a = f.cache.leaf(&target("a.test"), now).unwrap();
    let b = f.cache.leaf(&target("b.test"), now).unwrap();
    let ip = f.cache.leaf(&target("192.0.2.7"), now).unwrap();
    let renewed = f.cache.leaf(&target("a.test"), now + LEAF_LIFETIME - LEAF_RENEW_BEFORE).unwrap();
    let leaves = [("a", &a), ("b", &b), ("ip", &ip), ("a-renewed", &renewed)];
    let mut serials = Vec::new();
    for (name, key) in leaves {
        assert_eq!(key.cert.len(), 1, "the chain is the leaf; clients hold the CA");
        let path = write_leaf(f.dir.path(), name, &key.cert[0]);
        let path = path.to_str().unwrap();
        let (ok, text) = openssl(&[
            "x509",
            "-in",
            path,
            "-noout",
            "-serial",
            "-ext",
            "subjectAltName,authorityKeyIdentifier,basicConstraints,extendedKeyUsage,keyUsage",
        ]);
        assert!(ok, "{text}");
        let serial = text.lines().find_map(|l| l.strip_prefix("serial=")).expect("serial line").to_string();
        assert_eq!(serial.len(), 32, "{name}: 16 bytes, {serial}");
        serials.push(serial);
        assert_eq!(ext_value(&text, "Authority Key Identifier"), ca_ski, "{name}: {text}");
        assert_eq!(ext_value(&text, "Basic Constraints"), "CA:FALSE", "{name}: {text}");
        assert_eq!(ext_value(&text, "Extended Key Usage"), "TLS Web Server Authentication", "{name}");
        assert_eq!(ext_value(&text, "X509v3 Key Usage"), "Digital Signature", "{name}");
        let san = ext_value(&text, "Subject Alternative Name");
        let expected = if name == "ip" {
            "IP Address:192.0.2.7"
        } else if name == "b" {
            "DNS:b.test"
        } else {
            "DNS:a.test"
        };
        assert_eq!(san, expected, "{name}");
    }
    let mut distinct = serials.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), serials.len(), "{serials:?}");

    // Signed by the CA, for the name it names and no other, backdated by an hour, valid for a day.
    let a_pem = write_leaf(f.dir.path(), "a", &a.cert[0]);
    let a_pem = a_pem.to_str().unwrap();
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "-CAfile", ca, "-purpose", "sslserver"];
        args.extend_from_slice(extra);
        args.push(a_pem);
        openssl(&args)
    };
    let (ok, text) = verify(&["-verify_hostname", "a.test"]);
    assert!(ok && text.contains(": OK"), "{text}");
    let (ok, text) = verify(&["-verify_hostname", "b.test"]);
    assert!(!ok && text.contains("hostname mismatch"), "{text}");
    let at = |t: SystemTime| unix(t).to_string();
    let just_after_start = at(now - LEAF_BACKDATE + Duration::from_secs(120));
    assert!(verify(&["-attime", &just_after_start]).0, "valid from an hour ago");
    let before_start = at(now - LEAF_BACKDATE - Duration::from_secs(120));
    let (ok, text) = verify(&["-attime", &before_start]);
    assert!(!ok && text.contains("certificate is not yet valid"), "{text}");
    let near_end = at(now + LEAF_LIFETIME - Duration::from_secs(120));
    assert!(verify(&["-attime", &near_end]).0, "valid for a day");
    let past_end = at(now + LEAF_LIFETIME + Duration::from_secs(120));
    let (ok, text) = verify(&["-attime", &past_end]);
    assert!(!ok && text.contains("certificate has expired"), "{text}");
    let ip_pem = write_leaf(f.dir.path(), "ip", &ip.cert[0]);
    let (ok, text) = openssl(&["verify", "-CAfile", ca, "-verify_ip", "192.0.2.7", ip_pem.to_str().unwrap()]);
    assert!(ok, "{text}");
}

/// Serves one TLS connection per accepted client with `resolver`, answering `hello` to any request.
async fn tls_server(resolver: Arc<dyn ResolvesServerCert>) -> (u16, tokio::task::JoinHandle<()>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        for _ in 0..8 {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, task)
}

async fn curl(args: &[&str]) -> (i32, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("curl").args(["-sS", "--max-time", "10", "--noproxy", "*"]).args(args).output(),
    )
    .await
    .expect("curl finished in time")
    .expect("run curl");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn curl_trusting_only_the_sluice_ca_accepts_the_leaf_for_the_name_it_asked_for() {
    let f = fixture();
    let (port, server) = tls_server(f.cache.clone()).await;
    let url = format!("https://inspected.test:{port}/");
    let resolve = format!("inspected.test:{port}:127.0.0.1");
    let ca = f.ca_pem.to_str().unwrap();
    assert_eq!(curl(&["--cacert", ca, "--resolve", &resolve, &url]).await, (0, "hello".to_string()));
    assert_eq!(curl(&["--cacert", ca, "--resolve", &resolve, &url]).await, (0, "hello".to_string()));
    assert_eq!(f.cache.minted(), 1, "the second connection was served from the cache");
    // Without the sluice CA the leaf is just an unknown issuer.
    let empty = f.dir.path().join("empty.pem");
    let other = sluice::inspect::ca::init(&f.dir.path().join("other")).unwrap();
    std::fs::write(&empty, std::fs::read(&other.cert).unwrap()).unwrap();
    let (code, text) = curl(&["--cacert", empty.to_str().unwrap(), "--resolve", &resolve, &url]).await;
    assert_eq!(code, 60, "{text}");
    // No SNI (an IP URL): the SNI resolver has no name to mint for and the handshake fails.
    let (code, text) = curl(&["--cacert", ca, &format!("https://127.0.0.1:{port}/")]).await;
    assert_eq!(code, 35, "{text}");
    assert_eq!(f.cache.minted(), 1);
    server.abort();
}

#[tokio::test]
async fn an_ip_destination_is_served_its_ip_leaf_without_sni() {
    let f = fixture();
    let resolver = Arc::new(TargetCert { cache: f.cache.clone(), target: target("127.0.0.1") });
    let (port, server) = tls_server(resolver).await;
    let ca = f.ca_pem.to_str().unwrap();
    let (code, text) = curl(&["--cacert", ca, &format!("https://127.0.0.1:{port}/")]).await;
    assert_eq!((code, text.as_str()), (0, "hello"));
    assert_eq!(f.cache.minted(), 1);
    server.abort();
}
