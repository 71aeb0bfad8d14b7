//! Throughput of `matmul_f16` for decode (n = 1) and batch/prefill (n = 8, 32) shapes.
//!
//! `cargo run --release -p zeroshard-worker --example matmul_bench`
//!
//! For each shape it prints the time per call, the weight bytes read per second and the
//! arithmetic rate, on one thread and on rayon's global pool. "hot" reuses one weight matrix,
//! so small ones stay in cache; "cold" cycles through copies totalling at least 128 MiB, as
//! a model's layers do during decode.
use half::f16;
use std::hint::black_box;
use std::time::{Duration, Instant};
use zeroshard_worker::cpu::matmul::matmul_f16;

/// (k = in_features, m = out_features)
const SHAPES: [(usize, usize); 5] = [(1024, 1024), (1024, 2816), (2816, 1024), (1024, 32000), (64, 172)];
const COLD_BYTES: usize = 128 << 20;
const MIN_TIME: Duration = Duration::from_millis(300);

fn main() {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("one-thread pool");
    let all = rayon::current_num_threads();
    println!("{:>3} {:>5} {:>6} {:>4} {:>5} {:>11} {:>8} {:>8}", "n", "k", "m", "thr", "w", "us/call", "GB/s", "GFLOP/s");
    for n in [1, 8, 32] {
        for (k, m) in SHAPES {
            for cold in [false, true] {
                let copies = if cold { COLD_BYTES.div_ceil(2 * m * k).max(1) } else { 1 };
                let ws: Vec<Vec<f16>> = (0..copies).map(|c| weights(m * k, c)).collect();
                let x: Vec<f32> = (0..n * k).map(|v| ((v * 7 % 13) as f32 - 6.0) / 8.0).collect();
                let bias: Vec<f16> = (0..m).map(|v| f16::from_f32(v as f32 / m as f32)).collect();
                let mut out = vec![0f32; n * m];
                let mut run = || {
                    let mut calls = 0usize;
                    let start = Instant::now();
                    while start.elapsed() < MIN_TIME || calls < 3 * copies {
                        let w = &ws[calls % copies];
                        matmul_f16(black_box(&x), w, Some(&bias), &mut out, n, k, m);
                        black_box(&mut out);
                        calls += 1;
                    }
                    start.elapsed().as_secs_f64() / calls as f64
                };
                for (threads, secs) in [(1, one.install(&mut run)), (all, run())] {
                    let gbs = (2 * m * k) as f64 / secs / 1e9;
                    let gflops = (2 * n * k * m) as f64 / secs / 1e9;
                    let kind = if cold { "cold" } else { "hot" };
                    println!(
                        "{n:>3} {k:>5} {m:>6} {threads:>4} {kind:>5} {:>11.2} {gbs:>8.1} {gflops:>8.1}",
                        secs * 1e6
                    );
                }
            }
        }
    }
}

/// Deterministic weights in [-1, 1), different for each copy.
fn weights(len: usize, copy: usize) -> Vec<f16> {
    (0..len).map(|v| f16::from_f32((((v + copy) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)).collect()
}
