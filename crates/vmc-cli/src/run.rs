//! `vmc run -- PROGRAM ARGS`: starts an unmodified program with the preload library
//! interposed on its socket calls.
//!
//! The library is looked up next to the `vmc` binary (where cargo builds it), then in
//! `../lib/vmc/` beside it (an install prefix), unless `VMC_PRELOAD_LIB` names it. It
//! goes first in `LD_PRELOAD`, before whatever the caller preloads already. The
//! program replaces this process (exec), so its pid, signals and exit status are its
//! own. A statically linked program cannot be interposed: vmc says so and runs it
//! anyway, on plain TCP.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The preload library's file name.
pub const LIBRARY: &str = "libvmc_preload.so";

/// Finds the preload library (see the module documentation).
pub fn find_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMC_PRELOAD_LIB") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("VMC_PRELOAD_LIB names {}, which is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find the vmc binary's location")?;
    let dir = exe.parent().context("the vmc binary has no directory")?;
    let candidates = [dir.join(LIBRARY), dir.join("../lib/vmc").join(LIBRARY)];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.canonicalize().unwrap_or_else(|_| c.clone()));
        }
    }
    bail!(
        "cannot find {LIBRARY} (looked in {} and {}); build it with \
         `cargo build --release -p vmc-preload` or set VMC_PRELOAD_LIB",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// `LD_PRELOAD` with `lib` first and the caller's entries after it (without a second
/// copy of `lib`).
pub fn compose_preload(lib: &Path, existing: Option<OsString>) -> OsString {
    let mut out = OsString::from(lib);
    if let Some(existing) = existing {
        let existing = existing.to_string_lossy().into_owned();
        for entry in existing.split([' ', ':']).filter(|e| !e.is_empty()) {
            if Path::new(entry) != lib {
                out.push(":");
                out.push(entry);
            }
        }
    }
    out
}

/// Where `program` is, searched in `PATH` as exec would.
fn resolve(program: &OsString) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 {
        return Some(p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

/// Whether an ELF file asks for a dynamic loader (has a PT_INTERP program header).
/// `None` if it is not a 64-bit little-endian ELF file we can read (a script, say:
/// its interpreter is dynamic, and the preload applies to it).
pub fn is_dynamic_elf(path: &Path) -> Option<bool> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head).ok()?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(head[32..40].try_into().ok()?) as usize;
    let phentsize = u16_at(&head, 54);
    let phnum = u16_at(&head, 56);
    if phentsize < 4 || phnum > 4096 {
        return None;
    }
    let mut all = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take((phoff + phentsize * phnum) as u64)
        .read_to_end(&mut all)
        .ok()?;
    const PT_INTERP: u32 = 3;
    Some((0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        all.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) == PT_INTERP)
    }))
}

/// Replaces this process with `program args` under the preload library. Returns only
/// on failure.
pub fn run(program: OsString, args: Vec<OsString>) -> Result<()> {
    let lib = find_library()?;
    match resolve(&program) {
        None => bail!("{}: command not found", program.to_string_lossy()),
        Some(path) => {
            if is_dynamic_elf(&path) == Some(false) {
                eprintln!(
                    "vmc: {} is statically linked, so vmc cannot interpose on its socket \
                     calls; it runs unaccelerated (plain TCP).",
                    path.display()
                );
            }
        }
    }
    let preload = compose_preload(&lib, std::env::var_os("LD_PRELOAD"));
    let err = Command::new(&program)
        .args(args)
        .env("LD_PRELOAD", preload)
        .exec();
    Err(err).with_context(|| format!("cannot run {}", program.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_goes_first_once() {
        let lib = Path::new("/x/libvmc_preload.so");
        assert_eq!(compose_preload(lib, None), "/x/libvmc_preload.so");
        assert_eq!(
            compose_preload(lib, Some("/a.so /x/libvmc_preload.so:/b.so".into())),
            "/x/libvmc_preload.so:/a.so:/b.so"
        );
    }

    #[test]
    fn tells_static_from_dynamic() {
        // This test binary is dynamically linked; a shell script is not ELF.
        let me = std::env::current_exe().unwrap();
        assert_eq!(is_dynamic_elf(&me), Some(true));
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert_eq!(is_dynamic_elf(&script), None);
    }
}
