//! Replacing the program image: `execve`, `execv`, `execvp`, `execvpe`,
//! `posix_spawn` and `posix_spawnp`. (`fork` itself is not hooked: see
//! `crate::fork` for how connections are shared after one.)

use std::sync::Arc;
use std::time::Duration;

use libc::c_int;

use super::borrow;
use crate::table::{self, Sock};
use crate::{enter, real};

/// Before the program image is replaced: every accelerated connection the new image
/// inherits moves to TCP for good, both directions at exact byte boundaries
/// ([`vmc_conn::TcpStream::settle_on_tcp`]): what the new image writes on the
/// kernel socket reaches the peer after everything sent on the ring, and the peer
/// sends again, on TCP, whatever we had not read from its ring.
fn before_exec() {
    // A vfork child's exec (after it may have closed everything, the connections'
    // control sockets included) must not move the parent's connections.
    if !table::any() || crate::hands_off() {
        return;
    }
    let Some(_g) = enter() else { return };
    let mut seen: Vec<*const Sock> = Vec::new();
    let mut settling: Vec<(c_int, Arc<Sock>)> = Vec::new();
    let mut others: Vec<(c_int, Arc<Sock>)> = Vec::new();
    table::for_each(|fd, slot| {
        let Some(sock) = slot.as_ref() else { return };
        let Sock::Stream(s) = &**sock else { return };
        // SAFETY: `fd` is open: it is in the table, which close keeps current.
        let cloexec = rustix::io::fcntl_getfd(unsafe { borrow(fd) })
            .is_ok_and(|f| f.contains(rustix::io::FdFlags::CLOEXEC));
        let p = Arc::as_ptr(sock);
        if cloexec || seen.contains(&p) {
            return;
        }
        seen.push(p);
        // The new image will use the connection: a use, which claims it if a fork
        // left it unclaimed (fork, exec in the child, the parent closes its copy),
        // or asks the process that owns it to move it to TCP (`crate::fork`).
        if !s.owner.check() {
            if !s.owner.settled_elsewhere() {
                others.push((fd, sock.clone()));
            }
            return;
        }
        settling.push((fd, sock.clone()));
    });
    // The receiving directions first, then the sending ones (see
    // `TcpStream::settle_on_tcp_receiving`). Never hang an exec on a peer that does
    // not answer.
    let patience = Duration::from_millis(500);
    for (fd, sock) in &settling {
        if let Sock::Stream(s) = &**sock {
            if let Err(e) = s.settle_on_tcp_receiving(patience) {
                tracing::warn!(
                    fd,
                    "exec: could not move a connection's receiving side to TCP ({e})"
                );
            }
        }
    }
    // Connections another process owns since a fork: that process moves them (our
    // REWINDs above are there for it to find, should it own the other end).
    for (fd, sock) in &others {
        if let Sock::Stream(s) = &**sock {
            if !crate::fork::take_over(s) {
                tracing::warn!(
                    fd,
                    "exec: a connection another process owns stays on its rings"
                );
            }
        }
    }
    for (fd, sock) in &settling {
        if let Sock::Stream(s) = &**sock {
            match s.settle_on_tcp(patience) {
                // A process that shares it since a fork (our parent, say) may use
                // the kernel socket from here: the new image answers no request.
                Ok(()) => s.owner.mark_settled(),
                Err(e) => tracing::warn!(
                    fd,
                    "exec: could not move an accelerated connection to TCP ({e}); \
                     bytes may be lost to the new program image"
                ),
            }
        }
    }
}

/// `execve(2)`.
#[no_mangle]
pub unsafe extern "C" fn execve(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::execve(path, argv, envp) }
}

/// `execv(3)`.
#[no_mangle]
pub unsafe extern "C" fn execv(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::execv(path, argv) }
}

/// `execvp(3)`.
#[no_mangle]
pub unsafe extern "C" fn execvp(
    file: *const libc::c_char,
    argv: *const *const libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::execvp(file, argv) }
}

/// `execvpe(3)`.
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    file: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::execvpe(file, argv, envp) }
}

/// `posix_spawn(3)`: the new program inherits every descriptor not marked
/// close-on-exec, as after fork and exec, but the C library's exec happens where
/// no hook sees it. So inherited accelerated connections move to TCP for good
/// first, as before an exec (here and in the child they share the kernel socket).
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const libc::c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::posix_spawn(pid, path, actions, attr, argv, envp) }
}

/// `posix_spawnp(3)`: as [`posix_spawn`].
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const libc::c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    before_exec();
    // SAFETY: forwarding the program's arguments.
    unsafe { real::posix_spawnp(pid, file, actions, attr, argv, envp) }
}
