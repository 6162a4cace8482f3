//! Leaf certificates for inspected hosts: minted by the CA on first use, cached (LRU), renewed before
//! they expire, and served to rustls through its certificate resolver.
//!
//! Every leaf carries the one key generated when the cache is built: signing a certificate is cheap,
//! generating a key per host is not, and the key never leaves the process. Concurrent first requests
//! for one host wait on the same slot, so a host is minted once however many tunnels open at once.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use lru::LruCache;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::ca::{Ca, offset_time, random_serial};
use crate::policy::Target;

/// How long a leaf is valid. Short: a leaf that leaks is useless soon, and nothing needs it longer
/// than the cache keeps it.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Not-before is this far in the past, for clients whose clock is behind.
pub const LEAF_BACKDATE: Duration = Duration::from_secs(3600);
/// A cached leaf with less than this left is minted again, so no client sees one about to expire.
pub const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(6 * 3600);

/// Why no leaf could be served.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeafError {
    /// rcgen or rustls refused what was built (a name rcgen cannot encode, a broken key).
    Mint(String),
}

impl fmt::Display for LeafError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafError::Mint(e) => write!(f, "cannot mint a leaf certificate: {e}"),
        }
    }
}

impl std::error::Error for LeafError {}

/// One cache entry: filled once by whoever got there first; the others wait on it.
#[derive(Default)]
struct Slot {
    leaf: OnceLock<Result<Leaf, LeafError>>,
}

#[derive(Clone)]
struct Leaf {
    key: Arc<CertifiedKey>,
    /// When this leaf stops being served and a fresh one is minted.
    renew_at: SystemTime,
}

/// The leaf certificates of one process, keyed by the host they are for.
pub struct LeafCache {
    ca: Ca,
    /// The one leaf key: rcgen's view (to put its public half in certificates) and rustls' (to sign).
    key: KeyPair,
    signer: Arc<dyn rustls::sign::SigningKey>,
    entries: Mutex<LruCache<Target, Arc<Slot>>>,
    minted: AtomicU64,
}

impl fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCache").field("ca", &self.ca).field("minted", &self.minted()).finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache of at most `capacity` leaves signed by `ca`, with a fresh leaf key.
    pub fn new(ca: Ca, capacity: NonZeroUsize) -> Result<LeafCache, LeafError> {
        let key = KeyPair::generate().map_err(|e| LeafError::Mint(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer =
            rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| LeafError::Mint(e.to_string()))?;
        Ok(LeafCache { ca, key, signer, entries: Mutex::new(LruCache::new(capacity)), minted: AtomicU64::new(0) })
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Leaves minted so far (renewals included): what shows that concurrent first requests mint once.
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// The leaf for `target`, minted now if there is none or the cached one is due for renewal.
    pub fn leaf(&self, target: &Target, now: SystemTime) -> Result<Arc<CertifiedKey>, LeafError> {
        let slot = {
            // A poisoned lock only means another thread panicked mid-lookup; the map is still whole.
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.get(target) {
                Some(slot) if slot.leaf.get().is_none_or(|l| l.as_ref().is_ok_and(|l| now < l.renew_at)) => {
                    slot.clone()
                }
                _ => {
                    let slot = Arc::new(Slot::default());
                    entries.put(target.clone(), slot.clone());
                    slot
                }
            }
        };
        // Outside the lock: minting one host never holds up lookups for others.
        match slot.leaf.get_or_init(|| self.mint(target, now)) {
            Ok(leaf) => Ok(leaf.key.clone()),
            Err(e) => {
                // A failure is not cached: the next request tries again.
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                if entries.peek(target).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    entries.pop(target);
                }
                Err(e.clone())
            }
        }
    }

    fn mint(&self, target: &Target, now: SystemTime) -> Result<Leaf, LeafError> {
        let mint = |e: rcgen::Error| LeafError::Mint(e.to_string());
        let mut params = CertificateParams::default();
        let (san, cn) = match target {
            Target::Name(host) => {
                (SanType::DnsName(host.as_str().try_into().map_err(mint)?), host.as_str().to_string())
            }
            Target::Ip(ip) => (SanType::IpAddress(*ip), ip_text(*ip)),
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial().map_err(LeafError::Mint)?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let not_after = now + LEAF_LIFETIME;
        params.not_before = offset_time(now.checked_sub(LEAF_BACKDATE).unwrap_or(now));
        params.not_after = offset_time(not_after);
        let cert = params.signed_by(&self.key, &self.ca.issuer).map_err(mint)?;
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        self.minted.fetch_add(1, Ordering::Relaxed);
        Ok(Leaf {
            key: Arc::new(CertifiedKey::new(chain, self.signer.clone())),
            renew_at: not_after - LEAF_RENEW_BEFORE,
        })
    }
}

fn ip_text(ip: IpAddr) -> String {
    ip.to_string()
}

/// rustls asks by SNI. The tunnel has already checked that the SNI names the CONNECT host (the
/// fronting guard), so the name asked for is the host the leaf must be for; a ClientHello without SNI
/// (an IP destination) is served by [`TargetCert`] instead.
impl ResolvesServerCert for LeafCache {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let target = Target::parse(hello.server_name()?).ok()?;
        match self.leaf(&target, SystemTime::now()) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::error!(host = %target, error = %e, "no leaf certificate");
                None
            }
        }
    }
}

/// The leaf for one fixed destination, whatever the ClientHello says: for tunnels to an IP address,
/// where clients send no SNI.
#[derive(Debug)]
pub struct TargetCert {
    pub cache: Arc<LeafCache>,
    pub target: Target,
}

impl ResolvesServerCert for TargetCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.cache.leaf(&self.target, SystemTime::now()) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::error!(host = %self.target, error = %e, "no leaf certificate");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> (tempfile::TempDir, LeafCache) {
        let dir = tempfile::tempdir().unwrap();
        let files = super::super::ca::init(dir.path()).unwrap();
        let ca = Ca::load(&files.cert, &files.key, SystemTime::now()).unwrap();
        (dir, LeafCache::new(ca, NonZeroUsize::new(capacity).unwrap()).unwrap())
    }

    fn name(s: &str) -> Target {
        Target::parse(s).unwrap()
    }

    #[test]
    fn a_cached_leaf_is_served_until_it_is_due_for_renewal() {
        let (_dir, cache) = cache(4);
        let now = SystemTime::now();
        let a = cache.leaf(&name("a.test"), now).unwrap();
        let again = cache.leaf(&name("a.test"), now + Duration::from_secs(60)).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(cache.minted(), 1);
        let due = now + LEAF_LIFETIME - LEAF_RENEW_BEFORE;
        let renewed = cache.leaf(&name("a.test"), due).unwrap();
        assert!(!Arc::ptr_eq(&a, &renewed));
        assert_ne!(a.cert[0], renewed.cert[0]);
        assert_eq!(cache.minted(), 2);
    }

    #[test]
    fn the_least_recently_used_leaf_is_evicted() {
        let (_dir, cache) = cache(2);
        let now = SystemTime::now();
        let a = cache.leaf(&name("a.test"), now).unwrap();
        cache.leaf(&name("b.test"), now).unwrap();
        cache.leaf(&name("a.test"), now).unwrap();
        cache.leaf(&name("c.test"), now).unwrap();
        assert_eq!(cache.minted(), 3);
        assert!(Arc::ptr_eq(&a, &cache.leaf(&name("a.test"), now).unwrap()), "a was used last: kept");
        cache.leaf(&name("b.test"), now).unwrap();
        assert_eq!(cache.minted(), 4, "b was evicted and minted again");
    }

    #[test]
    fn concurrent_first_requests_for_one_host_mint_once() {
        let (_dir, cache) = cache(16);
        let cache = Arc::new(cache);
        let now = SystemTime::now();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, barrier) = (cache.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache.leaf(&name("busy.test"), now).unwrap()
                })
            })
            .collect();
        let keys: Vec<Arc<CertifiedKey>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(cache.minted(), 1);
        assert!(keys.iter().all(|k| Arc::ptr_eq(k, &keys[0])));
    }

    #[test]
    fn every_leaf_carries_the_one_process_key() {
        let (_dir, cache) = cache(4);
        let now = SystemTime::now();
        let spki = |k: &CertifiedKey| {
            let (_, x) = x509_parser::parse_x509_certificate(&k.cert[0]).unwrap();
            x.public_key().raw.to_vec()
        };
        let a = cache.leaf(&name("a.test"), now).unwrap();
        let b = cache.leaf(&Target::parse("192.0.2.7").unwrap(), now).unwrap();
        assert_eq!(spki(&a), spki(&b));
        let (_, x) = x509_parser::parse_x509_certificate(&b.cert[0]).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(format!("{:?}", san.value.general_names), "[IPAddress([192, 0, 2, 7])]");
    }
}
