use super::*;

/// SplitMix64: a small deterministic generator for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn f32s(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.uniform()).collect()
    }

    fn f16s(&mut self, len: usize) -> Vec<f16> {
        (0..len).map(|_| f16::from_f32(self.uniform())).collect()
    }
}

/// out[n, m] in f64, and Σ|x·w| per element (the scale the error is judged against).
fn reference(
    x: &[f32],
    w: &[f16],
    bias: Option<&[f16]>,
    n: usize,
    k: usize,
    m: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0f64; n * m];
    let mut scale = vec![0f64; n * m];
    for i in 0..n {
        for j in 0..m {
            let (mut s, mut a) = (0f64, 0f64);
            for kk in 0..k {
                let p = f64::from(x[i * k + kk]) * f64::from(w[j * k + kk].to_f32());
                s += p;
                a += p.abs();
            }
            if let Some(b) = bias {
                s += f64::from(b[j].to_f32());
                a += f64::from(b[j].to_f32()).abs();
            }
            out[i * m + j] = s;
            scale[i * m + j] = a;
        }
    }
    (out, scale)
}

fn check(isa: Isa, n: usize, k: usize, m: usize, with_bias: bool, rng: &mut Rng) {
    let x = rng.f32s(n * k);
    let w = rng.f16s(m * k);
    let bias = with_bias.then(|| rng.f16s(m));
    let mut out = vec![f32::NAN; n * m];
    matmul_with(isa, &x, &w, bias.as_deref(), &mut out, n, k, m);
    let (want, scale) = reference(&x, &w, bias.as_deref(), n, k, m);
    for (idx, ((got, want), scale)) in out.iter().zip(&want).zip(&scale).enumerate() {
        let err = (f64::from(*got) - want).abs();
        assert!(
            err <= 1e-5 * scale + 1e-30,
            "{isa:?} n={n} k={k} m={m} bias={with_bias}: out[{}, {}] = {got}, want {want} \
             (error {err:e}, scale {scale:e})",
            idx / m,
            idx % m,
        );
    }
}

#[test]
fn matches_f64_reference_across_shapes() {
    let mut rng = Rng(1);
    for isa in Isa::available() {
        for n in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 32, 33, 40] {
            for k in [1, 7, 8, 63, 64, 172, 1024] {
                for m in [1, 3, 16, 172, 513] {
                    for with_bias in [false, true] {
                        check(isa, n, k, m, with_bias, &mut rng);
                    }
                }
            }
        }
    }
}

#[test]
fn large_matrices_split_over_threads() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a rayon pool");
    let mut rng = Rng(2);
    // Work above PARALLEL_MIN_WORK, with ragged windows.
    // GEMM (140 rows): whole tiles summed in place over several blocks of k, cut tiles at
    // the last rows and at each window's edge.
    for (n, k, m) in [(1, 1024, 1031), (3, 517, 1500), (4, 1024, 700), (9, 700, 1201), (140, 1024, 300)] {
        for isa in Isa::available() {
            pool.install(|| check(isa, n, k, m, true, &mut rng));
        }
    }
}

#[test]
fn many_activation_rows_are_blocked() {
    let mut rng = Rng(4);
    // Row tiles with a partial last one (130 rows), k over many packed blocks of
    // columns with a ragged last one (12000), and more rows than one row block (1100 × 1000).
    for (n, k, m) in [(130, 1024, 37), (21, 12_000, 7), (1100, 1000, 50)] {
        for isa in Isa::available() {
            check(isa, n, k, m, false, &mut rng);
        }
    }
}

#[test]
fn simd_and_scalar_agree() {
    let mut rng = Rng(3);
    for (n, k, m) in [(1, 1024, 64), (2, 63, 172), (3, 64, 172), (4, 1000, 33), (12, 300, 70)] {
        let x = rng.f32s(n * k);
        let w = rng.f16s(m * k);
        let bias = rng.f16s(m);
        let mut want = vec![0f32; n * m];
        matmul_with(Isa::Scalar, &x, &w, Some(&bias), &mut want, n, k, m);
        for isa in Isa::available() {
            let mut got = vec![0f32; n * m];
            matmul_with(isa, &x, &w, Some(&bias), &mut got, n, k, m);
            for (p, q) in want.iter().zip(&got) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                    "{isa:?} n={n} k={k} m={m}: {q}, scalar {p}"
                );
            }
        }
    }
}

#[test]
fn exact_on_small_integers() {
    // Integers this small are exact in f16 and f32, whatever the summation order.
    let (n, k, m) = (3, 37, 5);
    let x: Vec<f32> = (0..n * k).map(|v| (v % 7) as f32 - 3.0).collect();
    let w: Vec<f16> = (0..m * k).map(|v| f16::from_f32((v % 5) as f32 - 2.0)).collect();
    let bias: Vec<f16> = (0..m).map(|v| f16::from_f32(v as f32)).collect();
    for isa in Isa::available() {
        let mut out = vec![0f32; n * m];
        matmul_with(isa, &x, &w, Some(&bias), &mut out, n, k, m);
        let (want, _) = reference(&x, &w, Some(&bias), n, k, m);
        let want: Vec<f32> = want.iter().map(|v| *v as f32).collect();
        assert_eq!(out, want, "{isa:?}");
    }
}

#[test]
fn activations_are_not_rounded_to_f16() {
    // 1 + 2^-20 rounds to 1 in f16: the sum would be exactly k.
    let k = 33;
    let x = vec![1.0 + 2f32.powi(-20); k];
    let w = vec![f16::ONE; 2 * k];
    for isa in Isa::available() {
        let mut out = [0f32; 2];
        matmul_with(isa, &x, &w, None, &mut out, 1, k, 2);
        for v in out {
            assert!((v - k as f32 - k as f32 * 2f32.powi(-20)).abs() < 1e-5, "{isa:?}: {v}");
        }
    }
}

#[test]
fn empty_dimensions() {
    let mut out = vec![1f32; 6];
    let bias = [f16::from_f32(0.5); 3];
    matmul_f16(&[], &[], Some(&bias), &mut out, 2, 0, 3);
    assert_eq!(out, vec![0.5; 6]);
    matmul_f16(&[], &[f16::ONE; 4], None, &mut [], 0, 4, 1);
}

#[test]
#[should_panic(expected = "w has 5 elements, expected m*k = 2*3")]
fn rejects_mismatched_lengths() {
    let mut out = vec![0f32; 2];
    matmul_f16(&[0.0; 3], &[f16::ZERO; 5], None, &mut out, 1, 3, 2);
}
