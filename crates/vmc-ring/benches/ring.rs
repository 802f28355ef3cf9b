//! Micro-benchmarks of the ring alone, without wake-ups or system calls.
//!
//! `cargo bench -p vmc-ring`. Three questions: what one write+read costs on one core
//! (copies plus index bookkeeping), how fast bytes cross between two cores for a given
//! ring size (the ceiling for `vmc bench stream`), and what a ping-pong costs when
//! both sides spin (the floor for `vmc bench rr`).

use std::hint::black_box;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vmc_ring::heap::ring_pair;

fn same_core(c: &mut Criterion) {
    let mut g = c.benchmark_group("same_core_write_read");
    for size in [64usize, 4096, 65536] {
        let (mut tx, mut rx) = ring_pair(256 * 1024);
        let src = vec![7u8; size];
        let mut dst = vec![0u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| {
                tx.write(black_box(&src)).unwrap();
                rx.read(black_box(&mut dst)).unwrap();
            })
        });
    }
    g.finish();
}

/// Streams `total` bytes in `size`-byte writes through a ring of `cap` bytes from
/// this thread to a reader thread; returns the elapsed time.
fn stream(cap: usize, size: usize, total: u64) -> Duration {
    let (mut tx, mut rx) = ring_pair(cap);
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < total {
            let n = rx.read(&mut buf).unwrap();
            if n == 0 {
                std::hint::spin_loop();
            }
            got += n as u64;
        }
    });
    let src = vec![1u8; size];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let want = (size as u64).min(total - sent) as usize;
        let n = tx.write(&src[..want]).unwrap();
        if n == 0 {
            std::hint::spin_loop();
        }
        sent += n as u64;
    }
    reader.join().unwrap();
    start.elapsed()
}

fn cross_core(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_core_stream");
    g.sample_size(10);
    const TOTAL: u64 = 256 << 20;
    g.throughput(Throughput::Bytes(TOTAL));
    for cap in [64 * 1024, 256 * 1024, 1024 * 1024] {
        for size in [64usize, 65536] {
            let id = BenchmarkId::new(format!("cap{}k", cap / 1024), size);
            g.bench_function(id, |b| {
                b.iter_custom(|iters| (0..iters).map(|_| stream(cap, size, TOTAL)).sum())
            });
        }
    }
    g.finish();
}

fn ping_pong(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_core_ping_pong");
    g.bench_function("64", |b| {
        b.iter_custom(|iters| {
            let (mut req_tx, mut req_rx) = ring_pair(4096);
            let (mut resp_tx, mut resp_rx) = ring_pair(4096);
            let echo = thread::spawn(move || {
                let mut buf = [0u8; 64];
                for _ in 0..iters {
                    let mut got = 0;
                    while got < 64 {
                        got += req_rx.read(&mut buf[got..]).unwrap();
                    }
                    resp_tx.write(&buf).unwrap();
                }
            });
            let msg = [3u8; 64];
            let mut buf = [0u8; 64];
            let start = Instant::now();
            for _ in 0..iters {
                req_tx.write(&msg).unwrap();
                let mut got = 0;
                while got < 64 {
                    got += resp_rx.read(&mut buf[got..]).unwrap();
                }
            }
            let t = start.elapsed();
            echo.join().unwrap();
            t
        })
    });
    g.finish();
}

criterion_group!(benches, same_core, cross_core, ping_pong);
criterion_main!(benches);
