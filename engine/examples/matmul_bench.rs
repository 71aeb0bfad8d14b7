//! Throughput of `matmul_f16` for decode (n = 1) and batch/prefill (n = 8, 32) shapes.
//!
//! `cargo run --release -p zeroshard-engine --example matmul_bench [n ...]`
//!
//! For each shape it prints the time per call, the weight bytes read per second and the
//! arithmetic rate, on one thread and on rayon's global pool (called from one of its
//! threads, as a forward pass running inside the pool would, and from outside it).
//!
//! Weights are "cold": each call reads another copy, the copies together far larger than
//! the last-level cache, as the layers of a model are during decode. The k = 64 shape is
//! "hot" (one copy), as a small matrix called thousands of times a second is. The first
//! lines give the plain memory read rate for comparison: on a shared machine it varies.
use half::f16;
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};
use zeroshard_engine::cpu::matmul::{matmul_f16, peak_gflops};

/// (k = in_features, m = out_features)
const SHAPES: [(usize, usize); 5] = [(1024, 1024), (1024, 2816), (2816, 1024), (1024, 32000), (64, 172)];
/// Weight bytes cycled through for cold runs.
const COLD_BYTES: usize = 256 << 20;
/// Shortest measurement; the best of three is reported.
const MIN_TIME: Duration = Duration::from_millis(150);

fn main() {
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
    let threads = rayon::current_num_threads();
    memory_baseline(&single);
    println!("# FMA peak, 1 thread: {:.1} GFLOP/s", single.install(|| peak_gflops(100)));
    println!("# FMA peak, pool: {:.1} GFLOP/s", peak_gflops(100));
    println!(
        "{:>3} {:>5} {:>6} {:>5} {:>16} {:>10} {:>8} {:>8}",
        "n", "k", "m", "w", "threads", "us/call", "GB/s", "GFLOP/s"
    );
    let ns: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("n: a row count")).collect();
    for n in if ns.is_empty() { vec![1, 8, 32] } else { ns } {
        for (k, m) in SHAPES {
            let hot = k * m < 64 * 1024;
            let copies = if hot { 1 } else { COLD_BYTES.div_ceil(2 * m * k) };
            let ws: Vec<Vec<f16>> = (0..copies).map(|c| weights(m * k, c)).collect();
            let x: Vec<f32> = (0..n * k).map(|v| ((v * 7 % 13) as f32 - 6.0) / 8.0).collect();
            let bias: Vec<f16> = (0..m).map(|v| f16::from_f32(v as f32 / m as f32)).collect();
            let mut out = vec![0f32; n * m];
            let mut run = || {
                best_of_three(copies, |c| {
                    matmul_f16(black_box(&x), &ws[c], Some(&bias), &mut out, n, k, m);
                    black_box(&mut out);
                })
            };
            let runs = [
                ("1".to_string(), single.install(&mut run)),
                (format!("{threads} (in pool)"), rayon::scope(|_| run())),
                (format!("{threads} (outside)"), run()),
            ];
            for (label, secs) in runs {
                println!(
                    "{n:>3} {k:>5} {m:>6} {:>5} {label:>16} {:>10.2} {:>8.1} {:>8.1}",
                    if hot { "hot" } else { "cold" },
                    secs * 1e6,
                    (2 * m * k) as f64 / secs / 1e9,
                    (2 * n * k * m) as f64 / secs / 1e9,
                );
            }
        }
    }
}

/// Seconds per call of `f(copy)`, cycling through `copies`: the best of three runs of at
/// least `MIN_TIME` each.
fn best_of_three(copies: usize, mut f: impl FnMut(usize)) -> f64 {
    (0..copies).for_each(&mut f);
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let mut calls = 0;
            while calls < copies || start.elapsed() < MIN_TIME {
                f(calls % copies);
                calls += 1;
            }
            start.elapsed().as_secs_f64() / calls as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Prints how fast plain code reads cold memory here, on one thread and on the pool.
fn memory_baseline(single: &rayon::ThreadPool) {
    let chunks: Vec<Vec<u64>> =
        (0..16).map(|c| (0..COLD_BYTES / 16 / 8).map(|v| (v ^ c) as u64).collect()).collect();
    let read = || {
        best_of_three(1, |_| {
            let xor = chunks.par_iter().map(|c| c.iter().fold(0, |a, v| a ^ v)).reduce(|| 0, |a, b| a ^ b);
            black_box(xor);
        })
    };
    for (label, secs) in [("1 thread", single.install(read)), ("pool", read())] {
        println!("# memory read, {label}: {:.1} GB/s", COLD_BYTES as f64 / secs / 1e9);
    }
}

/// Deterministic weights in [-1, 1), different for each copy.
fn weights(len: usize, copy: usize) -> Vec<f16> {
    (0..len).map(|v| f16::from_f32((((v + copy) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)).collect()
}
