//! Signed scoped credentials, one format for both proxies: `v1.<base64url(claims JSON)>.<base64url(HMAC-SHA256)>`.
//!
//! Instances verify credentials, they never look them up, so any number of them can share a key.

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The version prefix; the MAC covers it, so a token cannot be replayed under another format.
pub const TOKEN_PREFIX: &str = "v1.";
/// Longest token accepted: claims are small, and this bounds the work a hostile header can cause.
pub const MAX_TOKEN_LEN: usize = 2048;
/// Shortest signing key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;
/// The environment variable a signing key may come from.
pub const KEY_ENV: &str = "SLUICE_SIGNING_KEY";

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The value itself, for the one place that must use it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Which proxy a credential is for; a git credential opens no tunnel and an egress one pushes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Egress,
    Git,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Egress => "egress",
            Kind::Git => "git",
        }
    }
}

impl Kind {
    /// "an egress", "a git": for messages.
    pub fn with_article(self) -> &'static str {
        match self {
            Kind::Egress => "an egress",
            Kind::Git => "a git",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a credential says. Egress credentials name a policy; git credentials a repository and branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Session id.
    pub sid: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `OWNER/REPO`, for git credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// The working branch (without `refs/heads/`), for git credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
}

impl Claims {
    /// An egress credential: `sid` under `policy`, valid from `iat` to `exp`.
    pub fn egress(sid: &str, policy: &str, iat: u64, exp: u64) -> Claims {
        Claims { sid: sid.into(), kind: Kind::Egress, policy: Some(policy.into()), repo: None, branch: None, iat, exp }
    }

    /// A git credential: `sid` may push `branch` of `repo` (`OWNER/REPO`), valid from `iat` to `exp`.
    pub fn git(sid: &str, repo: &str, branch: &str, iat: u64, exp: u64) -> Claims {
        Claims {
            sid: sid.into(),
            kind: Kind::Git,
            policy: None,
            repo: Some(repo.into()),
            branch: Some(branch.into()),
            iat,
            exp,
        }
    }
}

/// Why a credential was refused. Messages never quote the token or the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialError {
    Malformed(&'static str),
    BadSignature,
    Expired { exp: u64, now: u64 },
    NotYetValid { iat: u64, now: u64 },
    WrongKind { expected: Kind, found: Kind },
    SessionMismatch,
    MissingClaim(&'static str),
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialError::Malformed(what) => write!(f, "malformed credential: {what}"),
            CredentialError::BadSignature => {
                f.write_str("credential signature does not verify (forged, altered, or signed with another key)")
            }
            CredentialError::Expired { exp, now } => {
                write!(f, "credential expired {} ago", human_duration(now.saturating_sub(*exp)))
            }
            CredentialError::NotYetValid { iat, now } => {
                write!(f, "credential is not valid for another {}", human_duration(iat.saturating_sub(*now)))
            }
            CredentialError::WrongKind { expected, found } => {
                write!(
                    f,
                    "this is {} credential; {} credential is needed here",
                    found.with_article(),
                    expected.with_article()
                )
            }
            CredentialError::SessionMismatch => {
                f.write_str("the session id given with the credential is not the one it was issued to")
            }
            CredentialError::MissingClaim(c) => write!(f, "credential lacks the {c:?} claim"),
        }
    }
}

impl std::error::Error for CredentialError {}

/// `90s`, `5m`, `2h`, `3d`: enough precision for a person reading a refusal.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A signing key: at least [`MIN_KEY_LEN`] bytes.
#[derive(Clone)]
pub struct SigningKey(Secret<Vec<u8>>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

impl SigningKey {
    /// A key from bytes (a file's content or an environment value), surrounding whitespace trimmed.
    pub fn from_bytes(bytes: &[u8]) -> Result<SigningKey, String> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_KEY_LEN {
            return Err(format!(
                "signing key is {} bytes long; at least {MIN_KEY_LEN} are needed (e.g. `openssl rand -hex 32`)",
                trimmed.len()
            ));
        }
        Ok(SigningKey(Secret::new(trimmed.to_vec())))
    }

    pub fn from_file(path: &Path) -> Result<SigningKey, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read signing key {}: {e}", path.display()))?;
        SigningKey::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn mac(&self, signed: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(self.0.expose()).unwrap_or_else(|_| unreachable!());
        mac.update(signed);
        mac
    }
}

/// The current key and, during a rotation, the previous one (still accepted, never used to sign).
#[derive(Clone, Debug)]
pub struct Keyring {
    current: SigningKey,
    previous: Option<SigningKey>,
}

impl Keyring {
    pub fn new(current: SigningKey, previous: Option<SigningKey>) -> Keyring {
        Keyring { current, previous }
    }

    /// The keys from a file (else `SLUICE_SIGNING_KEY`) and, during a rotation, the previous key's
    /// file. `Ok(None)` when no key is configured at all.
    pub fn load(current: Option<&Path>, previous: Option<&Path>) -> Result<Option<Keyring>, String> {
        let current = match current {
            Some(path) => Some(SigningKey::from_file(path)?),
            None => match std::env::var_os(KEY_ENV) {
                Some(v) => Some(SigningKey::from_bytes(v.as_encoded_bytes()).map_err(|e| format!("{KEY_ENV}: {e}"))?),
                None => None,
            },
        };
        let previous = previous.map(SigningKey::from_file).transpose()?;
        match current {
            Some(k) => Ok(Some(Keyring::new(k, previous))),
            None if previous.is_some() => Err("a previous key is set but there is no current key".into()),
            None => Ok(None),
        }
    }

    /// Signs claims with the current key.
    pub fn mint(&self, claims: &Claims) -> String {
        // Claims are plain strings and numbers: serialising them cannot fail.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let signed = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let tag = self.current.mac(signed.as_bytes()).finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Verifies a token's signature (constant-time, against the current then the previous key) and
    /// its validity window, and returns its claims.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, CredentialError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(CredentialError::Malformed("too long"));
        }
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or(CredentialError::Malformed("expected a v1. token"))?;
        let (payload, tag) =
            rest.split_once('.').ok_or(CredentialError::Malformed("expected three dot-separated parts"))?;
        if tag.contains('.') {
            return Err(CredentialError::Malformed("expected three dot-separated parts"));
        }
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| CredentialError::Malformed("signature is not base64url"))?;
        let signed = &token.as_bytes()[..TOKEN_PREFIX.len() + payload.len()];
        let keys = std::iter::once(&self.current).chain(self.previous.as_ref());
        let verified = keys.map(|k| k.mac(signed).verify_slice(&tag).is_ok()).fold(false, |a, b| a | b);
        if !verified {
            return Err(CredentialError::BadSignature);
        }
        // Only signed bytes are parsed: nothing an attacker wrote reaches the JSON parser.
        let json =
            URL_SAFE_NO_PAD.decode(payload).map_err(|_| CredentialError::Malformed("claims are not base64url"))?;
        let claims: Claims =
            serde_json::from_slice(&json).map_err(|_| CredentialError::Malformed("claims are not valid JSON"))?;
        if now >= claims.exp {
            return Err(CredentialError::Expired { exp: claims.exp, now });
        }
        // A little clock skew between the minting orchestrator and this instance is normal.
        if claims.iat > now + 60 {
            return Err(CredentialError::NotYetValid { iat: claims.iat, now });
        }
        Ok(claims)
    }

    /// [`Keyring::verify`], then checks the kind and the session id the client presented with it.
    pub fn verify_for(&self, token: &str, kind: Kind, session: &str, now: u64) -> Result<Claims, CredentialError> {
        let claims = self.verify(token, now)?;
        if claims.kind != kind {
            return Err(CredentialError::WrongKind { expected: kind, found: claims.kind });
        }
        if !bool::from(subtle::ConstantTimeEq::ct_eq(claims.sid.as_bytes(), session.as_bytes())) {
            return Err(CredentialError::SessionMismatch);
        }
        Ok(claims)
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Session ids, policy names and branch names travel in headers and log lines: keep them plain.
pub fn valid_session_id(sid: &str) -> bool {
    !sid.is_empty()
        && sid.len() <= 128
        && sid.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Why an `Authorization` or `Proxy-Authorization` header identifies nobody.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    NotBasic,
    BadEncoding,
    InvalidSessionId,
    NoKey,
    Credential(CredentialError),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Missing => f.write_str("this proxy requires credentials"),
            AuthError::NotBasic => f.write_str("Proxy-Authorization must use the Basic scheme"),
            AuthError::BadEncoding => f.write_str("Proxy-Authorization is not base64 of \"SESSION:TOKEN\""),
            AuthError::InvalidSessionId => {
                f.write_str("the session id must be 1 to 128 letters, digits, '.', '-' or '_'")
            }
            AuthError::NoKey => f.write_str("this proxy has no signing key, so it cannot verify credentials"),
            AuthError::Credential(e) => e.fmt(f),
        }
    }
}

/// HTTP Basic credentials, `Basic base64(USER:PASSWORD)`: the one parser both proxies use. The user is
/// the session id; the password, a credential, is kept as a [`Secret`].
#[derive(Debug, PartialEq, Eq)]
pub struct Basic {
    pub user: String,
    pub password: Secret<String>,
}

impl Basic {
    /// Reads a header value. The encoded part is bounded (a credential is at most
    /// [`MAX_TOKEN_LEN`] bytes), so a hostile header costs little; the session id is not checked here
    /// (see [`valid_session_id`]).
    pub fn parse(value: &[u8]) -> Result<Basic, AuthError> {
        let text = std::str::from_utf8(value).map_err(|_| AuthError::BadEncoding)?.trim();
        let (scheme, rest) = text.split_once(' ').ok_or(AuthError::NotBasic)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(AuthError::NotBasic);
        }
        let encoded = rest.trim();
        if encoded.len() > 4 * MAX_TOKEN_LEN {
            return Err(AuthError::BadEncoding);
        }
        let decoded = STANDARD.decode(encoded).map_err(|_| AuthError::BadEncoding)?;
        let decoded = String::from_utf8(decoded).map_err(|_| AuthError::BadEncoding)?;
        let (user, password) = decoded.split_once(':').ok_or(AuthError::BadEncoding)?;
        Ok(Basic { user: user.to_owned(), password: Secret::new(password.to_owned()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials() {
        let v = format!("Basic {}", STANDARD.encode("s-1:v1.abc.def"));
        let basic = Basic::parse(v.as_bytes()).unwrap();
        assert_eq!((basic.user.as_str(), basic.password.expose().as_str()), ("s-1", "v1.abc.def"));
        let lower = format!("basic  {} ", STANDARD.encode("a:"));
        assert_eq!(Basic::parse(lower.as_bytes()).unwrap().password.expose(), "");
        assert_eq!(Basic::parse(b"Bearer x"), Err(AuthError::NotBasic));
        assert_eq!(Basic::parse(b"Basic"), Err(AuthError::NotBasic));
        assert_eq!(Basic::parse(b"Basic !!!"), Err(AuthError::BadEncoding));
        assert_eq!(Basic::parse(b"Basic \xff"), Err(AuthError::BadEncoding));
        let no_colon = format!("Basic {}", STANDARD.encode("nocolon"));
        assert_eq!(Basic::parse(no_colon.as_bytes()), Err(AuthError::BadEncoding));
        let huge = format!("Basic {}", "A".repeat(4 * MAX_TOKEN_LEN + 4));
        assert_eq!(Basic::parse(huge.as_bytes()), Err(AuthError::BadEncoding));
    }

    fn keyring() -> Keyring {
        Keyring::new(SigningKey::from_bytes(&[7u8; 32]).unwrap(), None)
    }

    fn claims(kind: Kind) -> Claims {
        Claims {
            sid: "s1".into(),
            kind,
            policy: Some("trusted".into()),
            repo: None,
            branch: None,
            iat: 1000,
            exp: 2000,
        }
    }

    #[test]
    fn mint_then_verify() {
        let k = keyring();
        let t = k.mint(&claims(Kind::Egress));
        assert!(t.starts_with("v1."));
        assert_eq!(k.verify(&t, 1500), Ok(claims(Kind::Egress)));
        assert_eq!(k.verify_for(&t, Kind::Egress, "s1", 1500), Ok(claims(Kind::Egress)));
    }

    #[test]
    fn refusals_are_specific() {
        let k = keyring();
        let t = k.mint(&claims(Kind::Egress));
        assert_eq!(k.verify(&t, 2000), Err(CredentialError::Expired { exp: 2000, now: 2000 }));
        assert_eq!(k.verify(&t, 950), Ok(claims(Kind::Egress)), "within the clock-skew allowance");
        assert_eq!(k.verify(&t, 100), Err(CredentialError::NotYetValid { iat: 1000, now: 100 }));
        assert_eq!(
            k.verify_for(&t, Kind::Git, "s1", 1500),
            Err(CredentialError::WrongKind { expected: Kind::Git, found: Kind::Egress })
        );
        assert_eq!(k.verify_for(&t, Kind::Egress, "s2", 1500), Err(CredentialError::SessionMismatch));
        assert_eq!(
            CredentialError::WrongKind { expected: Kind::Git, found: Kind::Egress }.to_string(),
            "this is an egress credential; a git credential is needed here"
        );
        let other = Keyring::new(SigningKey::from_bytes(&[8u8; 32]).unwrap(), None);
        assert_eq!(other.verify(&t, 1500), Err(CredentialError::BadSignature));
        assert_eq!(k.verify("v2.a.b", 1500), Err(CredentialError::Malformed("expected a v1. token")));
        assert_eq!(k.verify("v1.ab", 1500), Err(CredentialError::Malformed("expected three dot-separated parts")));
        assert_eq!(k.verify("v1.a.b.c", 1500), Err(CredentialError::Malformed("expected three dot-separated parts")));
        assert_eq!(k.verify("v1.a.!!", 1500), Err(CredentialError::Malformed("signature is not base64url")));
    }

    #[test]
    fn tampered_claims_do_not_verify() {
        let k = keyring();
        let t = k.mint(&claims(Kind::Egress));
        let (head, tag) = t.rsplit_once('.').unwrap();
        let forged_claims = Claims { policy: Some("full".into()), ..claims(Kind::Egress) };
        let forged = format!("v1.{}.{tag}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap()));
        assert_ne!(head, forged.rsplit_once('.').unwrap().0);
        assert_eq!(k.verify(&forged, 1500), Err(CredentialError::BadSignature));
    }

    #[test]
    fn previous_key_still_verifies_during_rotation() {
        let old = SigningKey::from_bytes(&[1u8; 40]).unwrap();
        let new = SigningKey::from_bytes(&[2u8; 40]).unwrap();
        let t = Keyring::new(old.clone(), None).mint(&claims(Kind::Git));
        assert_eq!(Keyring::new(new.clone(), Some(old)).verify(&t, 1500), Ok(claims(Kind::Git)));
        assert_eq!(Keyring::new(new, None).verify(&t, 1500), Err(CredentialError::BadSignature));
    }

    #[test]
    fn keys_and_secrets_never_print() {
        let key = SigningKey::from_bytes(b"  0123456789abcdef0123456789abcdef-secret  ").unwrap();
        assert_eq!(format!("{key:?}"), "SigningKey([redacted])");
        assert_eq!(format!("{:?} {}", Secret::new("tok"), Secret::new("tok")), "[redacted] [redacted]");
        assert_eq!(
            SigningKey::from_bytes(b"short").unwrap_err(),
            "signing key is 5 bytes long; at least 32 are needed (e.g. `openssl rand -hex 32`)"
        );
    }
}
