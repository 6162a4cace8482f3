//! TLS inspection: the CA sandboxes trust and the leaf certificates it mints for inspected hosts
//! (the termination itself is `proxy::inspected`).

pub mod ca;
pub mod hello;
pub mod leaf;

pub use ca::{Ca, CaError, fingerprint_sha256};
pub use leaf::{LeafCache, LeafError, TargetCert};

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::InspectConfig;
use crate::policy::PolicySet;

/// What the server holds for inspection: the CA's leaf cache (present when `[inspect]` names a CA)
/// and the roots the upstream leg trusts besides the web PKI (`[inspect] extra_roots`).
#[derive(Debug, Default)]
pub struct Inspector {
    pub leaves: Option<Arc<LeafCache>>,
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// Every certificate in the `[inspect] extra_roots` files; a file that cannot be read or holds none is
/// an error naming it.
pub fn load_roots(files: &[std::path::PathBuf]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let mut roots = Vec::new();
    for path in files {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("[inspect] extra_roots: {}: {e}", path.display()))?;
        let blocks =
            pem::parse_many(&text).map_err(|e| format!("[inspect] extra_roots: {}: not PEM: {e}", path.display()))?;
        let before = roots.len();
        for block in blocks.into_iter().filter(|b| b.tag() == "CERTIFICATE") {
            let der = block.into_contents();
            x509_parser::parse_x509_certificate(&der)
                .map_err(|e| format!("[inspect] extra_roots: {}: a certificate does not parse: {e}", path.display()))?;
            roots.push(rustls::pki_types::CertificateDer::from(der));
        }
        if roots.len() == before {
            return Err(format!("[inspect] extra_roots: {}: no \"-----BEGIN CERTIFICATE-----\" block", path.display()));
        }
    }
    Ok(roots)
}

impl Inspector {
    /// Loads the CA named in `[inspect]` (none configured: an inspector that cannot terminate).
    pub fn load(config: &InspectConfig) -> Result<Inspector, String> {
        let extra_roots = load_roots(&config.extra_roots)?;
        let (Some(cert), Some(key)) = (&config.ca_cert, &config.ca_key) else {
            return Ok(Inspector { leaves: None, extra_roots });
        };
        let ca = Ca::load(cert, key, SystemTime::now()).map_err(|e| format!("[inspect] ca_cert / ca_key: {e}"))?;
        let capacity = NonZeroUsize::new(config.leaf_cache).unwrap_or(NonZeroUsize::MIN);
        let leaves = LeafCache::new(ca, capacity).map_err(|e| format!("[inspect]: {e}"))?;
        tracing::info!(fingerprint = %leaves.ca().fingerprint(), "inspection CA loaded");
        Ok(Inspector { leaves: Some(Arc::new(leaves)), extra_roots })
    }
}

/// Refuses a policy set that asks for inspection when no CA is configured, naming the policy, where
/// it asks, and the missing keys. (A policy reloaded to inspect on a server without a CA has its
/// tunnels refused one by one with `inspection_unavailable`: never relayed uninspected.)
pub fn check_served(policies: &PolicySet, has_ca: bool) -> Result<(), String> {
    if has_ca {
        return Ok(());
    }
    for name in policies.names() {
        let Some(policy) = policies.get(name) else { continue };
        if !policy.asks_for_inspection() {
            continue;
        }
        let why = if policy.inspection.mode == crate::policy::InspectMode::All {
            format!("({}:{}) asks for TLS inspection (inspect = \"all\")", policy.source, policy.inspection.line)
        } else {
            let line = policy.requests.rules().first().map_or(0, |r| r.rule.line);
            format!(
                "({}:{}) has [[requests]] rules, which need TLS inspection (inspect = \"auto\")",
                policy.source, line
            )
        };
        return Err(format!(
            "policy {name:?} {why} but no CA is configured: [inspect] ca_cert and ca_key are not set; create a CA \
             with `sluice ca init --dir DIR` and name its ca.pem and ca.key there, or set inspect = \"off\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policy;

    fn set_with(inspect: &str) -> PolicySet {
        let mut set = PolicySet::builtin();
        let text = format!("version = 1\nname = \"p\"\nlevel = \"full\"\n\ninspect = \"{inspect}\"\n");
        let (policy, _) = parse_policy("p.toml", &text, set.defaults()).unwrap();
        set.insert(policy);
        set
    }

    #[test]
    fn only_policies_asking_for_inspection_need_what_the_server_lacks() {
        assert_eq!(check_served(&PolicySet::builtin(), false), Ok(()));
        assert_eq!(check_served(&set_with("off"), false), Ok(()));
        assert_eq!(check_served(&set_with("auto"), false), Ok(()));
        let e = check_served(&set_with("all"), false).unwrap_err();
        assert!(e.starts_with("policy \"p\" (p.toml:5) asks for TLS inspection (inspect = \"all\") but no CA"), "{e}");
        assert_eq!(check_served(&set_with("all"), true), Ok(()));
        // auto with request rules asks too, naming the first rule.
        let mut set = PolicySet::builtin();
        let text =
            "version = 1\nname = \"r\"\nlevel = \"full\"\n[[requests]]\nhosts = [\"a.test\"]\naction = \"deny\"\n";
        set.insert(parse_policy("r.toml", text, set.defaults()).unwrap().0);
        let e = check_served(&set, false).unwrap_err();
        assert!(e.starts_with("policy \"r\" (r.toml:4) has [[requests]] rules, which need TLS inspection"), "{e}");
        assert_eq!(check_served(&set, true), Ok(()));
    }
}
