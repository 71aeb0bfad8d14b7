//! Source dtypes of checkpoint tensors and their conversion to f16.
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// The element types zeroshard reads from safetensors files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Parses the safetensors dtype string; `None` for types we do not read.
    pub fn from_safetensors(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(Self::F32),
            "F16" => Some(Self::F16),
            "BF16" => Some(Self::BF16),
            _ => None,
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// Converts little-endian `bytes` of this dtype into `out` (one f16 per element).
    /// f32 → f16 rounds to nearest even, as `tensor.half()` does.
    pub fn convert_to_f16(self, bytes: &[u8], out: &mut [f16]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size_bytes());
        match self {
            Self::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            Self::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_f32(bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32());
                }
            }
            Self::F32 => {
                // Convert through an aligned f32 buffer so that half can use F16C.
                const BLOCK: usize = 4096;
                let mut tmp = [0f32; BLOCK];
                for (o, c) in out.chunks_mut(BLOCK).zip(bytes.chunks(BLOCK * 4)) {
                    let t = &mut tmp[..o.len()];
                    for (x, b) in t.iter_mut().zip(c.chunks_exact(4)) {
                        *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                    o.convert_from_f32_slice(t);
                }
            }
        }
    }
}

impl DType {
    /// One element's little-endian `bytes` as text, for messages: `NaN`, `inf`,
    /// `-inf`, or a finite value (with a note when f16 cannot hold it).
    pub(crate) fn describe(self, bytes: &[u8]) -> String {
        let v = match self {
            Self::F16 => f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            Self::BF16 => bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            Self::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        };
        if v.is_finite() && f16::from_f32(v).is_infinite() {
            format!("{v:e} in {self:?}, beyond f16's range")
        } else {
            format!("{v}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_each_source_dtype() {
        let vals = [0.0f32, 1.0, -2.5, 65504.0, 1e-8, 0.1];
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![f16::ZERO; vals.len()];
        DType::F32.convert_to_f16(&f32_bytes, &mut out);
        for (o, v) in out.iter().zip(vals) {
            assert_eq!(*o, f16::from_f32(v));
        }
        let bf_bytes: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        DType::BF16.convert_to_f16(&bf_bytes, &mut out);
        for (o, v) in out.iter().zip(vals) {
            assert_eq!(*o, f16::from_f32(bf16::from_f32(v).to_f32()));
        }
        let f16_bytes: Vec<u8> = vals.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        DType::F16.convert_to_f16(&f16_bytes, &mut out);
        for (o, v) in out.iter().zip(vals) {
            assert_eq!(*o, f16::from_f32(v));
        }
    }

    #[test]
    fn long_f32_runs_cross_blocks() {
        let vals: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.37 - 1000.0).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![f16::ZERO; vals.len()];
        DType::F32.convert_to_f16(&bytes, &mut out);
        assert!(out.iter().zip(&vals).all(|(o, v)| *o == f16::from_f32(*v)));
    }
}
