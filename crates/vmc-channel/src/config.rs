//! How a channel is set up: ring size, how ends sleep, how long they spin first.

use std::time::Duration;

/// How a waiting end sleeps and how its peer wakes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeMode {
    /// A futex on the sleep word in the segment: both ends on one kernel. The
    /// default: no file descriptors beyond the segment, one system call per wake.
    Futex,
    /// One eventfd per sleeper, exchanged at the handshake; a sleeper also watches
    /// the liveness socket, so a dead peer is noticed at once. Lets a channel sit in
    /// an epoll set.
    EventFd,
    /// No kernel object: sleepers poll with back-off. For peers in different VMs
    /// sharing an ivshmem region, where neither a futex nor an eventfd reaches.
    Poll,
}

impl WakeMode {
    /// The name used on the command line and in `VMC_WAKE`.
    pub fn name(self) -> &'static str {
        match self {
            WakeMode::Futex => "futex",
            WakeMode::EventFd => "eventfd",
            WakeMode::Poll => "poll",
        }
    }

    /// Parses [`WakeMode::name`].
    pub fn from_name(s: &str) -> Option<WakeMode> {
        match s {
            "futex" => Some(WakeMode::Futex),
            "eventfd" => Some(WakeMode::EventFd),
            "poll" => Some(WakeMode::Poll),
            _ => None,
        }
    }

    pub(crate) fn kind(self) -> vmc_ring::WakeKind {
        match self {
            WakeMode::Futex => vmc_ring::WakeKind::Futex,
            WakeMode::EventFd => vmc_ring::WakeKind::EventFd,
            WakeMode::Poll => vmc_ring::WakeKind::Poll,
        }
    }
}

/// Ring bytes per direction unless configured otherwise.
///
/// Chosen by measurement (`bench/ring-size`, README "Ring size"): the smallest ring
/// that streams 64 KiB writes within 5% of the best capacity measured (up to 4 MiB),
/// and as fast as any size up to 512 KiB for 1 MiB writes; small writes and round
/// trips do not depend on it. A channel then costs 260 KiB of shared memory (two
/// rings and one page of header), which matters once there are many connections.
pub const DEFAULT_CAPACITY: usize = 128 * 1024;

/// The longest a waiting end spins before it sleeps, unless configured otherwise.
///
/// A futex wake-up round trip costs 5-40 us on a 2-vCPU VM; a peer that answers
/// sooner than that is cheaper to wait for by spinning. The spin is adaptive (see
/// `spin.rs`): it shrinks when waits are long (an idle channel spins almost not at
/// all) and yields the CPU after the first microseconds, so a peer that needs this
/// core gets it.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// How often a sleeping end that cannot be told of its peer's death (futex and poll
/// modes) checks whether the peer is still alive.
pub const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);

/// Settings chosen by the end that creates a channel (the attacher follows them).
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Ring bytes per direction: a power of two (see [`DEFAULT_CAPACITY`]).
    pub capacity: usize,
    /// How waiting ends sleep (see [`WakeMode`]).
    pub wake: WakeMode,
    /// The longest spin before sleeping; zero sleeps at once (see [`DEFAULT_SPIN`]).
    pub spin: Duration,
}

impl Default for ChannelConfig {
    fn default() -> ChannelConfig {
        ChannelConfig {
            capacity: DEFAULT_CAPACITY,
            wake: WakeMode::Futex,
            spin: DEFAULT_SPIN,
        }
    }
}

impl ChannelConfig {
    /// The defaults, overridden by `VMC_RING_BYTES`, `VMC_WAKE` (futex, eventfd,
    /// poll) and `VMC_SPIN_US` where set. Values that do not parse are ignored with
    /// a warning: configuration mistakes must not break a program.
    pub fn from_env() -> ChannelConfig {
        let mut c = ChannelConfig::default();
        if let Some(v) = env_parse("VMC_RING_BYTES", |s| {
            s.parse::<usize>()
                .ok()
                .filter(|n| vmc_ring::ChannelLayout::for_capacity(*n).is_ok())
        }) {
            c.capacity = v;
        }
        if let Some(v) = env_parse("VMC_WAKE", WakeMode::from_name) {
            c.wake = v;
        }
        if let Some(v) = env_parse("VMC_SPIN_US", |s| s.parse::<u64>().ok()) {
            c.spin = Duration::from_micros(v);
        }
        c
    }
}

fn env_parse<T>(name: &str, parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
    let raw = std::env::var(name).ok()?;
    let v = parse(raw.trim());
    if v.is_none() {
        tracing::warn!("ignoring {name}={raw:?}: not a valid value");
    }
    v
}
