// Causal attention of each new row over its sequence's KV cache.
//
// `rows` describes each query row r, 3 values per row: the device address of
// its sequence's cache, the cache's capacity in tokens, and the row's absolute
// position. A cache is [layers, 2, capacity, kv_dim] f16: layer l's K block,
// then its V block. The table is the same for every layer of a step.

__device__ __forceinline__ h16* kv_block(const long long* rows, long long r, int layer, int v, int kv_dim) {
    const long long cap = rows[3 * r + 1];
    return (h16*)rows[3 * r] + ((long long)(2 * layer + v) * cap) * kv_dim;
}

#define ATT_CHUNK 256
#define ATT_MAX_HEAD_DIM 256

// Writes this step's k, v rows ([rows, kv_dim]) into the caches at their positions.
extern "C" __global__ void kv_append(const h16* k, const h16* v, const long long* rows, int layer, int kv_dim) {
    const long long r = blockIdx.x;
    h16* kc = kv_block(rows, r, layer, 0, kv_dim);
    h16* vc = kv_block(rows, r, layer, 1, kv_dim);
    const long long pos = rows[3 * r + 2];
    for (int c = threadIdx.x; c < kv_dim; c += blockDim.x) {
        kc[pos * kv_dim + c] = k[r * kv_dim + c];
        vc[pos * kv_dim + c] = v[r * kv_dim + c];
    }
}

// grid (rows, num_heads), blockDim.x a multiple of 32 (128). Scores in chunks of
// ATT_CHUNK keys with an online softmax, so any context length fits:
//   out[r, h] = softmax_j(q[r, h] . k[j, kvh] * scale + slope[h] * j) . v[j, kvh]
// over j in [lo, pos], lo = pos + 1 - window when window > 0. `slopes` may be 0.
extern "C" __global__ void attention(const h16* q, h16* out, const long long* rows, const float* slopes, int layer,
                                     int num_heads, int num_kv_heads, int head_dim, int window, float scale) {
    __shared__ float qs[ATT_MAX_HEAD_DIM];
    __shared__ float sc[ATT_CHUNK];
    __shared__ float scratch[32];
    const long long r = blockIdx.x;
    const int h = blockIdx.y;
    const int kv_dim = num_kv_heads * head_dim;
    const h16* kc = kv_block(rows, r, layer, 0, kv_dim);
    const h16* vc = kv_block(rows, r, layer, 1, kv_dim);
    const int pos = (int)rows[3 * r + 2];
    const int kvh = h / (num_heads / num_kv_heads);
    const int lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const int n = pos + 1 - lo;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float slope = slopes ? slopes[h] : 0.0f;

    const h16* qr = q + (r * num_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = h2f(qr[d]) * scale;
    __syncthreads();

    // Each thread owns output dims d = threadIdx.x + i * blockDim.x (constant
    // trip counts, so `acc` stays in registers).
    float acc[ATT_MAX_HEAD_DIM / 32];
#pragma unroll
    for (int i = 0; i < ATT_MAX_HEAD_DIM / 32; ++i) acc[i] = 0.0f;
    float m = -3.0e38f, l = 0.0f;
    for (int c0 = 0; c0 < n; c0 += ATT_CHUNK) {
        const int cn = min(ATT_CHUNK, n - c0);
        for (int j = warp; j < cn; j += warps) {  // one warp per key
            const int key = lo + c0 + j;
            const h16* kr = kc + (long long)key * kv_dim + kvh * head_dim;
            float s = 0.0f;
            for (int d = lane; d < head_dim; d += 32) s += qs[d] * h2f(kr[d]);
            s = warp_sum(s);
            if (lane == 0) sc[j] = s + slope * (float)key;
        }
        __syncthreads();
        float cm = -3.0e38f;
        for (int j = threadIdx.x; j < cn; j += blockDim.x) cm = fmaxf(cm, sc[j]);
        const float m_new = fmaxf(m, block_max(cm, scratch));
        const float corr = expf(m - m_new);
        __syncthreads();  // every thread has read sc for the max
        float ps = 0.0f;
        for (int j = threadIdx.x; j < cn; j += blockDim.x) {
            const float p = expf(sc[j] - m_new);
            sc[j] = p;
            ps += p;
        }
        l = l * corr + block_sum(ps, scratch);  // block_sum syncs: sc holds the chunk's p
#pragma unroll
        for (int i = 0; i < ATT_MAX_HEAD_DIM / 32; ++i) {
            const int d = threadIdx.x + i * blockDim.x;
            if (d < head_dim) {
                float a = acc[i] * corr;
                const h16* vp = vc + (long long)lo * kv_dim + kvh * head_dim + d;
                for (int j = 0; j < cn; ++j) a += sc[j] * h2f(vp[(long long)(c0 + j) * kv_dim]);
                acc[i] = a;
            }
        }
        m = m_new;
        __syncthreads();  // sc is rewritten by the next chunk
    }
    h16* o = out + (r * num_heads + h) * head_dim;
    const float inv = 1.0f / l;
#pragma unroll
    for (int i = 0; i < ATT_MAX_HEAD_DIM / 32; ++i) {
        const int d = threadIdx.x + i * blockDim.x;
        if (d < head_dim) o[d] = f2h(acc[i] * inv);
    }
}
