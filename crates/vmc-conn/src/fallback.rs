//! Why a connection stays on TCP (like SMC's fallback reasons).

use std::fmt;
use std::io;

/// Why a connection is not accelerated. A connection that falls back works exactly
/// as plain TCP; this only says why vmc stayed out of its way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// vmc is turned off (`VMC_DISABLE=1`).
    Disabled,
    /// No vmc listener is registered for the destination on this host (not
    /// co-resident, not running vmc, or in another network namespace).
    NoListener,
    /// A listener is registered but no process that accepted the connection
    /// called back (it just exited, or accepts without vmc).
    ListenerGone,
    /// The process that called back named another connection: an address
    /// translation in between, or a name shared by two connections.
    NotMatched,
    /// Listener side: the client sent no vmc handshake (it does not run vmc).
    PeerNotVmc,
    /// The handshake failed; the text says how.
    Handshake(String),
    /// The registry could not be used; the text says why.
    Registry(String),
    /// The administrator's policy (`/etc/vmc/policy`) denies it; the text says
    /// which rule.
    Policy(String),
}

impl Fallback {
    /// Classifies an error that ended a client's handshake.
    pub(crate) fn from_refusal(e: &io::Error) -> Fallback {
        match e.kind() {
            // The client closed the handshake socket without attaching (the ATTACH
            // named another connection); unread bytes make that a reset.
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset => Fallback::NotMatched,
            _ => Fallback::Handshake(e.to_string()),
        }
    }

    /// A short stable name, for `vmc stat` and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Fallback::Disabled => "disabled",
            Fallback::NoListener => "no-listener",
            Fallback::ListenerGone => "listener-gone",
            Fallback::NotMatched => "not-matched",
            Fallback::PeerNotVmc => "peer-not-vmc",
            Fallback::Handshake(_) => "handshake",
            Fallback::Registry(_) => "registry",
            Fallback::Policy(_) => "policy",
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::Disabled => write!(f, "vmc is disabled (VMC_DISABLE)"),
            Fallback::NoListener => write!(f, "no co-resident vmc listener for this address"),
            Fallback::ListenerGone => write!(f, "the registered vmc listener did not answer"),
            Fallback::NotMatched => write!(f, "the listener did not recognise this connection"),
            Fallback::PeerNotVmc => write!(f, "the peer does not run vmc"),
            Fallback::Handshake(e) => write!(f, "vmc handshake failed: {e}"),
            Fallback::Registry(e) => write!(f, "vmc registry unusable: {e}"),
            Fallback::Policy(e) => write!(f, "{e}"),
        }
    }
}
