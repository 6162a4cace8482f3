//! The inspection CA as an operator meets it: `sluice ca init`, `sluice ca show`, checked with
//! `openssl`, and `sluice serve` refusing policies that ask for inspection it cannot give.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sluice(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(dir)
        .env_remove("SLUICE_SIGNING_KEY")
        .output()
        .expect("run sluice");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `AA:BB:…` from openssl's `sha256 Fingerprint=AA:BB:…` line.
fn openssl_fingerprint(cert: &Path) -> String {
    let line = openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-fingerprint", "-sha256"]);
    line.trim().split_once('=').expect("fingerprint line").1.to_string()
}

#[test]
fn ca_init_writes_a_ca_openssl_reads_and_never_overwrites_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let run = sluice(tmp.path(), &["ca", "init", "--dir", dir.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let cert = dir.join("ca.pem");
    let key = dir.join("ca.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let fingerprint = openssl_fingerprint(&cert);
    assert!(run.stdout.contains(&format!("SHA-256 fingerprint: {fingerprint}\n")), "{}", run.stdout);
    assert!(run.stdout.contains(&format!("ca_cert = \"{}\"\nca_key = \"{}\"", cert.display(), key.display())));

    assert!(!std::fs::read_to_string(&cert).unwrap().contains('\r'), "Unix line endings");
    let text = openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-text"]);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
    assert!(text.contains("Subject Key Identifier"), "{text}");
    assert!(text.contains("Subject: O = sluice, CN = sluice inspection CA "), "{text}");
    // The key is the certificate's: openssl derives the same public key from both.
    let from_key = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
    let from_cert = openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-pubkey"]);
    assert_eq!(from_key, from_cert);

    let key_before = std::fs::read(&key).unwrap();
    let cert_before = std::fs::read(&cert).unwrap();
    let again = sluice(tmp.path(), &["ca", "init", "--dir", dir.to_str().unwrap()]);
    assert_eq!(again.code, 2);
    assert_eq!(
        again.stderr,
        format!("sluice ca init: {} already exists; refusing to overwrite a CA\n", cert.display())
    );
    assert_eq!(std::fs::read(&key).unwrap(), key_before);
    assert_eq!(std::fs::read(&cert).unwrap(), cert_before);
}

#[test]
fn ca_show_prints_the_certificate_and_its_fingerprint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    assert_eq!(sluice(tmp.path(), &["ca", "init", "--dir", dir.to_str().unwrap()]).code, 0);
    let cert = dir.join("ca.pem");
    let expected =
        format!("{}SHA-256 fingerprint: {}\n", std::fs::read_to_string(&cert).unwrap(), openssl_fingerprint(&cert));
    let by_dir = sluice(tmp.path(), &["ca", "show", "--dir", dir.to_str().unwrap()]);
    assert_eq!((by_dir.code, by_dir.stdout.as_str()), (0, expected.as_str()), "{}", by_dir.stderr);
    std::fs::write(
        tmp.path().join("sluice.toml"),
        format!("[inspect]\nca_cert = \"{}\"\nca_key = \"{}\"\n", cert.display(), dir.join("ca.key").display()),
    )
    .unwrap();
    // The default configuration file is ./sluice.toml.
    let by_config = sluice(tmp.path(), &["ca", "show"]);
    assert_eq!((by_config.code, by_config.stdout.as_str()), (0, expected.as_str()), "{}", by_config.stderr);
    std::fs::write(tmp.path().join("other.toml"), "[egress]\n").unwrap();
    let none = sluice(tmp.path(), &["ca", "show", "--config", "other.toml"]);
    assert_eq!((none.code, none.stderr.as_str()), (2, "sluice ca show: other.toml sets no [inspect] ca_cert\n"));
    let missing = sluice(tmp.path(), &["ca", "show", "--dir", "nowhere"]);
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.starts_with("sluice ca show: nowhere/ca.pem: "), "{}", missing.stderr);
}

const LISTENS: &str =
    "[egress]\nlisten = \"127.0.0.1:0\"\n[git]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";

fn write_policy(dir: &Path, inspect: &str) {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("policies/acme.toml"),
        format!(
            "version = 1\nname = \"acme\"\nlevel = \"custom\"\nallow = [\"api.example.com\"]\ninspect = \"{inspect}\"\n"
        ),
    )
    .unwrap();
}

#[test]
fn serve_refuses_a_policy_asking_for_inspection_without_a_ca() {
    let tmp = tempfile::tempdir().unwrap();
    write_policy(tmp.path(), "all");
    std::fs::write(tmp.path().join("sluice.toml"), LISTENS).unwrap();
    let run = sluice(tmp.path(), &["serve", "--config", "sluice.toml"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "sluice: policy \"acme\" (policies/acme.toml:5) asks for TLS inspection (inspect = \"all\") but no CA is \
             configured: [inspect] ca_cert and ca_key are not set; create a CA with `sluice ca init --dir DIR`"
        ),
        "{}",
        run.stderr
    );
}

#[test]
fn serve_refuses_half_a_ca_and_a_ca_that_is_not_one() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("sluice.toml"), format!("{LISTENS}[inspect]\nca_key = \"ca.key\"\n")).unwrap();
    let run = sluice(tmp.path(), &["serve", "--config", "sluice.toml"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.starts_with("sluice.toml:8:1: error: [inspect] ca_key needs ca_cert"), "{}", run.stderr);

    std::fs::write(tmp.path().join("ca.pem"), "not a certificate\n").unwrap();
    std::fs::write(tmp.path().join("ca.key"), "not a key\n").unwrap();
    std::fs::write(
        tmp.path().join("sluice.toml"),
        format!("{LISTENS}[inspect]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\n"),
    )
    .unwrap();
    let run = sluice(tmp.path(), &["serve", "--config", "sluice.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains(
            "sluice: [inspect] ca_cert / ca_key: ca.pem: expected a PEM certificate: no \"-----BEGIN CERTIFICATE-----\" block"
        ),
        "{}",
        run.stderr
    );
}

#[test]
fn serve_refuses_extra_roots_it_cannot_read() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("roots.pem"), "no certificates here\n").unwrap();
    for (roots, want) in [
        ("roots.pem", "sluice: [inspect] extra_roots: roots.pem: no \"-----BEGIN CERTIFICATE-----\" block"),
        ("missing.pem", "sluice: [inspect] extra_roots: missing.pem: No such file or directory"),
    ] {
        std::fs::write(tmp.path().join("sluice.toml"), format!("{LISTENS}[inspect]\nextra_roots = [\"{roots}\"]\n"))
            .unwrap();
        let run = sluice(tmp.path(), &["serve", "--config", "sluice.toml"]);
        assert_eq!(run.code, 2);
        assert!(run.stderr.contains(want), "{}", run.stderr);
    }
}

#[test]
fn serve_with_a_ca_loads_it_and_serves() {
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(sluice(tmp.path(), &["ca", "init", "--dir", "ca"]).code, 0);
    // Any PEM certificate serves as an extra root; the CA's own will do.
    let config =
        format!("{LISTENS}[inspect]\nca_cert = \"ca/ca.pem\"\nca_key = \"ca/ca.key\"\nextra_roots = [\"ca/ca.pem\"]\n");
    std::fs::write(tmp.path().join("sluice.toml"), config).unwrap();
    // A policy asking for inspection is served once there is a CA (its tunnels are refused until
    // termination is built: tests/inspect_rules.rs).
    write_policy(tmp.path(), "all");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config", "sluice.toml"])
        .current_dir(tmp.path())
        .env_remove("SLUICE_SIGNING_KEY")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice serve");
    let stderr = child.stderr.take().expect("stderr");
    let fingerprint = openssl_fingerprint(&tmp.path().join("ca/ca.pem"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut loaded, mut listening) = (false, false);
    while !(loaded && listening) && Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
        loaded |= line.contains("inspection CA loaded") && line.contains(&fingerprint);
        listening |= line.contains("sluice listening");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(loaded && listening, "loaded={loaded} listening={listening}");
}

#[test]
fn validate_reads_the_inspect_table_and_the_inspect_key() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("ops.toml"), "[inspect]\nleaf_cache = 0\n").unwrap();
    let run = sluice(tmp.path(), &["validate", "ops.toml"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.starts_with("ops.toml:2:1: error: leaf_cache must be at least 1"), "{}", run.stdout);
    write_policy(tmp.path(), "al");
    let run = sluice(tmp.path(), &["validate", "policies/acme.toml"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.starts_with("policies/acme.toml:5:11: error: unknown inspect mode \"al\""), "{}", run.stdout);
    assert!(run.stdout.contains("did you mean \"all\"?"), "{}", run.stdout);
}
