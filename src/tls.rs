//! The rustls configurations TLS termination uses: the server side clients see (leaves from the CA's
//! cache) and the client side that verifies the upstream (web PKI plus `[inspect] extra_roots`).
//! Pure construction and classification; no I/O.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ResolvesServerCert;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};

use crate::policy::Target;

/// ALPN both legs offer, in preference order.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server config a terminated tunnel's client handshakes with: certificates from `resolver`,
/// ALPN `h2` and `http/1.1`.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS server config: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The client config of the upstream leg: the web PKI's roots and `extra`; ALPN as given (`h2` and
/// `http/1.1`, or `http/1.1` alone for a connection that is to carry an upgrade).
pub fn client_config(extra: &[CertificateDer<'static>], alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|e| format!("[inspect] extra_roots: a certificate is not a usable root: {e}"))?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client config: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The name the upstream's certificate must carry (and the SNI sent): the CONNECT host.
pub fn server_name(target: &Target) -> Result<ServerName<'static>, String> {
    match target {
        Target::Name(host) => ServerName::try_from(host.as_str().to_string()).map_err(|e| format!("{host}: {e}")),
        Target::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
    }
}

/// Why a certificate did not verify, in words, when the failure was the certificate's (`None` for
/// any other TLS failure).
pub fn certificate_problem(e: &rustls::Error) -> Option<String> {
    let rustls::Error::InvalidCertificate(cert) = e else { return None };
    Some(match cert {
        CertificateError::UnknownIssuer => "unknown issuer (no trusted root signed it)".to_string(),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired".to_string(),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "not valid yet".to_string(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "name mismatch (the certificate is for another host)".to_string()
        }
        CertificateError::Revoked => "revoked".to_string(),
        CertificateError::BadSignature => "bad signature".to_string(),
        other => format!("{other:?}"),
    })
}

/// The rustls error inside an I/O error from a tokio-rustls handshake.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_failures_are_worded() {
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert!(certificate_problem(&e).is_some_and(|w| w.starts_with("unknown issuer")));
        let e = rustls::Error::InvalidCertificate(CertificateError::Expired);
        assert_eq!(certificate_problem(&e).as_deref(), Some("expired"));
        let e = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        assert!(certificate_problem(&e).is_some_and(|w| w.starts_with("name mismatch")));
        assert_eq!(certificate_problem(&rustls::Error::HandshakeNotComplete), None);
    }

    #[test]
    fn configs_build_with_the_web_pki() {
        let c = client_config(&[], &ALPN).expect("client config");
        assert_eq!(c.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        let ip: Target = Target::parse("127.0.0.1").expect("ip");
        assert!(matches!(server_name(&ip), Ok(ServerName::IpAddress(_))));
    }
}
