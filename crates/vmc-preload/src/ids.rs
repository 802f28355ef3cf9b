//! Changes of user: `setuid` and its relatives.
//!
//! A server whose master listens as root and whose workers drop to an unprivileged
//! user (Apache's prefork and event models, nginx, PostgreSQL's postmaster) accepts
//! under another uid than the one it registered its listeners as. Its clients of
//! the registrant's user would bind their offer sockets in that user's private
//! directory, which the worker cannot reach; so right after a change of effective
//! uid, each listener this process holds is published in the shared registry as
//! the new user's (see `vmc_conn::TcpListener::serve_as_current_user`), and clients
//! that see it there bind where the worker can call them.

use libc::{c_int, uid_t};

use crate::table::{self, Sock};
use crate::{enter, real, shield};

/// After a call that may have changed our effective uid (`r` its result).
fn after(r: c_int, before: u32) -> c_int {
    if r != 0 || vmc_os::euid() == before || crate::hands_off() {
        return r;
    }
    let Some(_g) = enter() else { return r };
    let saved = crate::errno();
    table::for_each_waiting(|_, sock| {
        if let Sock::Listener(l) = &**sock {
            let _ = shield(|| {
                l.serve_as_current_user();
                Ok(())
            });
        }
    });
    crate::set_errno(saved);
    r
}

/// `setuid(2)`.
#[no_mangle]
pub unsafe extern "C" fn setuid(uid: uid_t) -> c_int {
    let before = vmc_os::euid();
    // SAFETY: forwarding the program's arguments.
    after(unsafe { real::setuid(uid) }, before)
}

/// `seteuid(2)`.
#[no_mangle]
pub unsafe extern "C" fn seteuid(uid: uid_t) -> c_int {
    let before = vmc_os::euid();
    // SAFETY: forwarding the program's arguments.
    after(unsafe { real::seteuid(uid) }, before)
}

/// `setreuid(2)`.
#[no_mangle]
pub unsafe extern "C" fn setreuid(ruid: uid_t, euid: uid_t) -> c_int {
    let before = vmc_os::euid();
    // SAFETY: forwarding the program's arguments.
    after(unsafe { real::setreuid(ruid, euid) }, before)
}

/// `setresuid(2)`.
#[no_mangle]
pub unsafe extern "C" fn setresuid(ruid: uid_t, euid: uid_t, suid: uid_t) -> c_int {
    let before = vmc_os::euid();
    // SAFETY: forwarding the program's arguments.
    after(unsafe { real::setresuid(ruid, euid, suid) }, before)
}
