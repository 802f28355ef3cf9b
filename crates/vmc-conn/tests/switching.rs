//! Exact path switching under load: both ends stream to each other while their
//! writers move their sending direction between TCP and shared memory thousands of
//! times; every byte is checked against its offset.

mod common;

use std::io::{Read, Write};
use std::thread;

use vmc_conn::{Path, TcpListener, TcpStream};

fn private_registry() {
    common::private_registry();
}

/// The byte at stream offset `i` of the stream tagged `tag`.
fn pattern(tag: u8, i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ tag
}

/// A small deterministic generator (xorshift), so failures replay.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes `total` bytes of stream `tag`, moving the send path after every few writes.
fn writer(s: TcpStream, tag: u8, total: u64, seed: u64) -> u64 {
    let mut s = s;
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; 70_000];
    let mut off = 0u64;
    let mut switches = 0u64;
    while off < total {
        if rng.below(3) == 0 {
            let to = if s.send_path() == Path::Shm {
                Path::Tcp
            } else {
                Path::Shm
            };
            s.set_send_path(to).unwrap();
            switches += 1;
        }
        let n = (1 + rng.below(buf.len() as u64)).min(total - off) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(tag, off + i as u64);
        }
        s.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    switches
}

/// Reads stream `tag` to its end and checks every byte.
fn reader(s: TcpStream, tag: u8, seed: u64) -> u64 {
    let mut s = s;
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; 100_000];
    let mut off = 0u64;
    loop {
        let want = 1 + rng.below(buf.len() as u64) as usize;
        let n = s.read(&mut buf[..want]).unwrap_or_else(|e| {
            panic!(
                "stream {tag} at {off}: {e}; path {:?}, {:?}",
                s.recv_path(),
                s.traffic()
            )
        });
        if n == 0 {
            return off;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != pattern(tag, off + i as u64) {
                let exp: Vec<u8> = (0..8).map(|j| pattern(tag, off + i as u64 + j)).collect();
                panic!(
                    "stream {tag} byte {}: got {:?} expected {:?}, read of {n}, path {:?}, traffic {:?}",
                    off + i as u64,
                    &buf[i..(i + 8).min(n)],
                    exp,
                    s.recv_path(),
                    s.traffic()
                );
            }
        }
        off += n as u64;
    }
}

#[test]
fn thousands_of_switches_under_bidirectional_load_lose_nothing() {
    private_registry();
    const TOTAL: u64 = 64 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let r = s.try_clone().unwrap();
        let rd = thread::spawn(move || reader(r, 1, 11));
        let switches = writer(s, 2, TOTAL, 12);
        (rd.join().unwrap(), switches)
    });
    let c = TcpStream::connect(addr).unwrap();
    let r = c.try_clone().unwrap();
    let rd = thread::spawn(move || reader(r, 2, 21));
    let switches = writer(c.clone(), 1, TOTAL, 22);
    let got = rd.join().unwrap();
    let (server_got, server_switches) = server.join().unwrap();
    assert_eq!(got, TOTAL);
    assert_eq!(server_got, TOTAL);
    assert!(c.is_accelerated(), "{:?}", c.fallback_reason());
    let t = c.traffic();
    assert!(
        t.shm_out > 0 && t.tcp_out > 0 && t.shm_in > 0 && t.tcp_in > 0,
        "{t:?}"
    );
    eprintln!("switches: client {switches}, server {server_switches}; client traffic {t:?}");
    assert!(switches + server_switches > 1000);
}

#[test]
fn one_way_stream_without_switches() {
    private_registry();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        reader(s, 1, 5)
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let mut off = 0u64;
    let mut buf = vec![0u8; 10_000];
    while off < 1 << 20 {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern(1, off + i as u64);
        }
        c.write_all(&buf).unwrap();
        off += buf.len() as u64;
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(server.join().unwrap(), off);
}
