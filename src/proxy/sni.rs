//! `[egress] check_sni`: on a tunnel that is not terminated, the ClientHello's server name must be the
//! CONNECT host. The client's first bytes are read (usually one read) before the tunnel starts and go
//! upstream first, so the splice path after them is unchanged.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::inspect::hello::{self, Hello, MAX_HELLO};
use crate::policy::{Host, Target};

/// Why a tunnel was refused after its `200`, as the tunnel's closing `end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SniRefusal {
    /// The ClientHello names another host than the CONNECT target.
    Mismatch { sni: String },
    /// The CONNECT names a host and the ClientHello names none ("domainless" fronting: the front end
    /// picks the backend by `Host` alone). Ended as `sni_mismatch`.
    NoSni,
    /// A TLS handshake began but no well-formed ClientHello followed (in time, or at all).
    BadHello,
    /// Nothing came from either side for the idle timeout.
    Idle,
    /// The server's hard stop came first.
    Shutdown,
}

impl SniRefusal {
    pub(crate) fn end(&self) -> &'static str {
        match self {
            SniRefusal::Mismatch { .. } | SniRefusal::NoSni => "sni_mismatch",
            SniRefusal::BadHello => "bad_client_hello",
            SniRefusal::Idle => "idle_timeout",
            SniRefusal::Shutdown => "shutdown",
        }
    }
}

/// A fatal `access_denied` alert, in the record version every TLS client reads.
pub(crate) const ACCESS_DENIED: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];

pub(crate) fn names_target(sni: &str, target: &Target) -> bool {
    match target {
        Target::Name(host) => Host::parse(sni).is_ok_and(|h| h == *host),
        // An address has no name to agree with: a name in the hello is another host.
        Target::Ip(_) => false,
    }
}

/// What one read of the hello takes at most.
const READ_CHUNK: usize = 4096;

/// Reads the client's first bytes into `early` until they show a ClientHello (checked), or not TLS.
/// A server that speaks first (SMTP, SSH banners) is not TLS: the check steps aside. `wait` bounds
/// each read once a handshake has begun; `idle` bounds the wait for anyone's first byte.
pub(crate) async fn check(
    client: &TcpStream,
    upstream: &TcpStream,
    early: &mut Vec<u8>,
    target: &Target,
    wait: Duration,
    idle: Duration,
) -> Result<(), SniRefusal> {
    loop {
        match hello::parse(early) {
            Hello::NotTls => return Ok(()),
            // An address has no name to agree with; a name must be in the hello.
            Hello::Complete { sni: None } if matches!(target, Target::Ip(_)) => return Ok(()),
            Hello::Complete { sni: None } => {
                tracing::warn!(destination = %target, "tunnel refused: the ClientHello has no SNI, and the CONNECT names a host (sni_mismatch)");
                return Err(SniRefusal::NoSni);
            }
            Hello::Complete { sni: Some(sni) } if names_target(&sni, target) => return Ok(()),
            Hello::Complete { sni: Some(sni) } => return Err(SniRefusal::Mismatch { sni }),
            Hello::Malformed => return Err(SniRefusal::BadHello),
            Hello::Partial => {}
        }
        if early.is_empty() {
            tokio::select! {
                biased;
                r = client.readable() => if r.is_err() { return Ok(()) },
                // The tunnel itself reports the error or the server's greeting.
                _ = upstream.readable() => return Ok(()),
                () = tokio::time::sleep(idle) => return Err(SniRefusal::Idle),
            }
        } else {
            match tokio::time::timeout(wait, client.readable()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(SniRefusal::BadHello),
                Err(_) => return Err(SniRefusal::BadHello),
            }
        }
        // Read straight into `early`'s spare room (never zeroed: a 4 KiB zeroed buffer per read was a
        // sixth of a tunnel's instructions); at most READ_CHUNK per read. The room is let go with the
        // early bytes once they are written upstream.
        let was = early.len();
        // A short read clears the readiness, so the tunnel's first read waits for bytes after the hello
        // instead of opening with an `EAGAIN`.
        match super::tunnel::read_draining(client, early, READ_CHUNK) {
            // The client left: with nothing checked, nothing goes upstream but what it already sent
            // of a hello, which is refused; before any byte, the tunnel sees the close.
            Ok(0) => return if was == 0 { Ok(()) } else { Err(SniRefusal::BadHello) },
            Ok(_) => {
                if early.len() > MAX_HELLO + READ_CHUNK {
                    return Err(SniRefusal::BadHello);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Ok(()),
        }
    }
}
