// Per-row norms and RoPE. One block per row; statistics in f32.

// out = x * rsqrt(mean(x^2) + eps) * w  (Llama RMSNorm)
extern "C" __global__ void rms_norm(const h16* x, const h16* w, h16* out, int cols, float eps) {
    __shared__ float scratch[32];
    const h16* xr = x + (long long)blockIdx.x * cols;
    h16* o = out + (long long)blockIdx.x * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = h2f(xr[c]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = f2h(h2f(w[c]) * (h2f(xr[c]) * inv));
}

// out = (x - mean) * rsqrt(var + eps) * w + b  (torch LayerNorm, biased variance)
extern "C" __global__ void layer_norm(const h16* x, const h16* w, const h16* b, h16* out, int cols, float eps) {
    __shared__ float scratch[32];
    const h16* xr = x + (long long)blockIdx.x * cols;
    h16* o = out + (long long)blockIdx.x * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += h2f(xr[c]);
    const float mean = block_sum(s, scratch) / cols;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = h2f(xr[c]) - mean;
        sq += d * d;
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        o[c] = f2h((h2f(xr[c]) - mean) * inv * h2f(w[c]) + h2f(b[c]));
    }
}

// HF rotate-half RoPE in place: in each head, pairs (i, i + head_dim/2) of row r
// turn by the angle whose cos/sin are cos[r, i], sin[r, i] ([rows, head_dim/2]).
extern "C" __global__ void rope(h16* x, const float* cos_t, const float* sin_t, int cols, int head_dim) {
    const long long r = blockIdx.x;
    const int half = head_dim / 2;
    h16* xr = x + r * cols;
    for (int p = threadIdx.x; p < cols / 2; p += blockDim.x) {
        const int head = p / half, i = p % half;
        h16* h = xr + head * head_dim;
        const float c = cos_t[r * half + i], s = sin_t[r * half + i];
        const float a = h2f(h[i]), b = h2f(h[i + half]);
        h[i] = f2h(a * c - b * s);
        h[i + half] = f2h(b * c + a * s);
    }
}
