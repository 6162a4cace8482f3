//! The inspection CA: created by `sluice ca init`, loaded from `[inspect] ca_cert` / `ca_key`, and the
//! issuer every leaf certificate is signed by.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The file names `sluice ca init` writes in its directory.
pub const CERT_FILE: &str = "ca.pem";
pub const KEY_FILE: &str = "ca.key";

/// How long a fresh CA is valid: long enough to bake into a sandbox image, short enough to rotate.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Clocks in sandboxes drift; a CA valid from yesterday is valid everywhere today.
const CA_BACKDATE: Duration = Duration::from_secs(86_400);

/// Why the CA could not be created or loaded. Each variant names the file it is about.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaError {
    /// `ca init` would overwrite an existing file.
    Exists(PathBuf),
    Io {
        path: PathBuf,
        error: String,
    },
    /// The file holds no PEM block of the kind expected, or one that does not parse.
    BadPem {
        path: PathBuf,
        what: &'static str,
        error: String,
    },
    /// The certificate is not a CA (no `basicConstraints` with `CA:TRUE`, or no `keyCertSign`).
    NotCa(PathBuf),
    /// The key does not belong to the certificate.
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
    },
    /// The certificate is outside its validity period now.
    NotValidNow {
        path: PathBuf,
        not_before: i64,
        not_after: i64,
    },
    /// rcgen could not build or sign the certificate.
    Mint(String),
}

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaError::Exists(p) => write!(f, "{} already exists; refusing to overwrite a CA", p.display()),
            CaError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            CaError::BadPem { path, what, error } => write!(f, "{}: expected a PEM {what}: {error}", path.display()),
            CaError::NotCa(p) => {
                write!(f, "{}: not a CA certificate (needs basicConstraints CA:TRUE and keyCertSign)", p.display())
            }
            CaError::KeyMismatch { cert, key } => {
                write!(f, "{} is not the private key of {}", key.display(), cert.display())
            }
            CaError::NotValidNow { path, not_before, not_after } => write!(
                f,
                "{}: the certificate is not valid now (valid from {} to {}, unix seconds)",
                path.display(),
                not_before,
                not_after
            ),
            CaError::Mint(e) => write!(f, "cannot build the certificate: {e}"),
        }
    }
}

impl std::error::Error for CaError {}

/// The CA files `ca init` wrote.
#[derive(Debug)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: String,
}

/// A loaded CA: its certificate (what sandboxes trust) and the issuer that signs leaves.
pub struct Ca {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Ca").field("fingerprint", &fingerprint_sha256(&self.cert_der)).finish_non_exhaustive()
    }
}

/// `SHA-256` of the DER certificate as `AA:BB:…`, the form `openssl x509 -fingerprint -sha256` prints.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut out = String::with_capacity(digest.len() * 3);
    for (i, b) in digest.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02X}"));
    }
    out
}

/// Seconds since the epoch as rcgen's time type (the clock before 1970 or past 9999 is a broken clock;
/// it is clamped rather than trusted).
pub(crate) fn offset_time(t: SystemTime) -> OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).min(253_402_300_799);
    OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// 16 random bytes with the top bit clear: a positive serial with 127 bits of entropy (CA/B BR 7.1
/// asks for at least 64).
pub(crate) fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a serial number: {e}"))?;
    bytes[0] &= 0x7f;
    // A leading zero byte would be re-encoded away; keep the length fixed and the value positive.
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A fresh CA certificate and key, as PEM: `(cert, key)`.
pub fn generate(now: SystemTime) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Mint(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sluice");
    let serial = random_serial().map_err(CaError::Mint)?;
    // The CN carries part of the serial so two installations' CAs are told apart in a trust store.
    let tag: String = serial.to_bytes().iter().take(4).map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("sluice inspection CA {tag}"));
    params.distinguished_name = dn;
    params.serial_number = Some(serial);
    // Path length 0: this CA signs leaves, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = offset_time(now.checked_sub(CA_BACKDATE).unwrap_or(UNIX_EPOCH));
    params.not_after = offset_time(now + CA_LIFETIME);
    let cert = params.self_signed(&key).map_err(|e| CaError::Mint(e.to_string()))?;
    Ok((pem_lf("CERTIFICATE", cert.der().to_vec()), pem_lf("PRIVATE KEY", key.serialize_der())))
}

/// `sluice ca init --dir DIR`: writes `ca.pem` and `ca.key` (mode 0600) in `dir`, creating it, and
/// never overwriting either file.
pub fn init(dir: &Path) -> Result<CaFiles, CaError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.symlink_metadata().is_ok() {
            return Err(CaError::Exists(p.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| CaError::Io { path: dir.to_path_buf(), error: e.to_string() })?;
    let (cert_pem, key_pem) = generate(SystemTime::now())?;
    // The key first, created 0600 from the start (never chmod-ed after being readable), and both
    // `create_new` so a file that appeared meanwhile is still not overwritten.
    write_new(&key_path, key_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, cert_pem.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    let der = pem_block(&cert_path, &cert_pem, "CERTIFICATE", "certificate")?;
    Ok(CaFiles { cert: cert_path, key: key_path, fingerprint: fingerprint_sha256(&der) })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CaError::Exists(path.to_path_buf())
        } else {
            CaError::Io { path: path.to_path_buf(), error: e.to_string() }
        }
    };
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    // The umask may have narrowed the mode; it never widens it, but set it exactly anyway.
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// PEM with Unix line endings, as every other file in `/etc` has them.
fn pem_lf(tag: &str, der: Vec<u8>) -> String {
    pem::encode_config(&pem::Pem::new(tag, der), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| CaError::Io { path: path.to_path_buf(), error: e.to_string() })
}

/// The first PEM block with `tag` in `text`, as DER.
fn pem_block(path: &Path, text: &str, tag: &str, what: &'static str) -> Result<Vec<u8>, CaError> {
    let bad = |error: String| CaError::BadPem { path: path.to_path_buf(), what, error };
    let blocks = pem::parse_many(text).map_err(|e| bad(e.to_string()))?;
    blocks
        .into_iter()
        .find(|b| b.tag() == tag)
        .map(|b| b.into_contents())
        .ok_or_else(|| bad(format!("no \"-----BEGIN {tag}-----\" block")))
}

/// The CA certificate's PEM and DER from a file, checked to be one certificate that parses.
pub fn read_cert(path: &Path) -> Result<(String, CertificateDer<'static>), CaError> {
    let text = read(path)?;
    let der = pem_block(path, &text, "CERTIFICATE", "certificate")?;
    x509_parser::parse_x509_certificate(&der).map_err(|e| CaError::BadPem {
        path: path.to_path_buf(),
        what: "certificate",
        error: e.to_string(),
    })?;
    let pem = pem_lf("CERTIFICATE", der.clone());
    Ok((pem, CertificateDer::from(der)))
}

impl Ca {
    /// Loads `[inspect] ca_cert` and `ca_key`: the certificate must be a CA valid now, and the key its own.
    pub fn load(cert_path: &Path, key_path: &Path, now: SystemTime) -> Result<Ca, CaError> {
        let (cert_pem, cert_der) = read_cert(cert_path)?;
        let key_text = read(key_path)?;
        let key = KeyPair::from_pem(&key_text).map_err(|e| CaError::BadPem {
            path: key_path.to_path_buf(),
            what: "PKCS#8 private key",
            error: e.to_string(),
        })?;
        let bad_cert = |e: String| CaError::BadPem { path: cert_path.to_path_buf(), what: "certificate", error: e };
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| bad_cert(e.to_string()))?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch { cert: cert_path.to_path_buf(), key: key_path.to_path_buf() });
        }
        let signs = x509.key_usage().ok().flatten().is_none_or(|ku| ku.value.key_cert_sign());
        if !x509.is_ca() || !signs {
            return Err(CaError::NotCa(cert_path.to_path_buf()));
        }
        let validity = x509.validity();
        let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
        let now_secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        if now_secs < not_before || now_secs > not_after {
            return Err(CaError::NotValidNow { path: cert_path.to_path_buf(), not_before, not_after });
        }
        if let Ok(meta) = std::fs::metadata(key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                key = %key_path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the inspection CA key is readable by others; chmod 600 it"
            );
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad_cert(e.to_string()))?;
        Ok(Ca { cert_pem, cert_der, issuer })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint_sha256(&self.cert_der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_ca_that_loads_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ca");
        let files = init(&out).unwrap();
        assert_eq!(files.cert, out.join("ca.pem"));
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let ca = Ca::load(&files.cert, &files.key, SystemTime::now()).unwrap();
        assert_eq!(ca.fingerprint(), files.fingerprint);
        assert_eq!(ca.fingerprint().len(), 32 * 3 - 1);
        let before = std::fs::read(&files.key).unwrap();
        assert_eq!(init(&out).unwrap_err(), CaError::Exists(out.join("ca.pem")));
        std::fs::remove_file(&files.cert).unwrap();
        assert_eq!(init(&out).unwrap_err(), CaError::Exists(out.join("ca.key")));
        assert_eq!(std::fs::read(&files.key).unwrap(), before, "the key was not touched");
    }

    #[test]
    fn load_refuses_a_foreign_key_a_leaf_and_an_expired_ca() {
        let dir = tempfile::tempdir().unwrap();
        let a = init(&dir.path().join("a")).unwrap();
        let b = init(&dir.path().join("b")).unwrap();
        let now = SystemTime::now();
        assert_eq!(
            Ca::load(&a.cert, &b.key, now).unwrap_err(),
            CaError::KeyMismatch { cert: a.cert.clone(), key: b.key.clone() }
        );
        let later = now + CA_LIFETIME + Duration::from_secs(86_400);
        assert!(matches!(Ca::load(&a.cert, &a.key, later), Err(CaError::NotValidNow { .. })));
        // A self-signed certificate that is not a CA.
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["leaf.test".to_string()]).unwrap().self_signed(&key).unwrap();
        let leaf_cert = dir.path().join("leaf.pem");
        let leaf_key = dir.path().join("leaf.key");
        std::fs::write(&leaf_cert, leaf.pem()).unwrap();
        std::fs::write(&leaf_key, key.serialize_pem()).unwrap();
        assert_eq!(Ca::load(&leaf_cert, &leaf_key, now).unwrap_err(), CaError::NotCa(leaf_cert.clone()));
        let err = Ca::load(&a.key, &a.key, now).unwrap_err().to_string();
        assert!(err.ends_with("expected a PEM certificate: no \"-----BEGIN CERTIFICATE-----\" block"), "{err}");
        let missing = dir.path().join("nope.pem");
        assert!(Ca::load(&missing, &a.key, now).unwrap_err().to_string().starts_with(&missing.display().to_string()));
    }

    #[test]
    fn serials_are_positive_fixed_length_and_differ() {
        let a = random_serial().unwrap().to_bytes();
        let b = random_serial().unwrap().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
        assert_ne!(a, b);
    }
}
