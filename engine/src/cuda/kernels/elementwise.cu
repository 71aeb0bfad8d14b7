// Elementwise ops over f16 activations, computed in f32. One thread per
// element, grid-stride loops; `n` counts elements.

// out = silu(gate) * up
extern "C" __global__ void silu_mul(const h16* gate, const h16* up, h16* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = h2f(gate[i]);
        out[i] = f2h(g / (1.0f + expf(-g)) * h2f(up[i]));
    }
}

// out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
extern "C" __global__ void gelu_tanh(const h16* x, h16* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = h2f(x[i]);
        out[i] = f2h(0.5f * v * (1.0f + tanhf(0.7978846f * (v + 0.044715f * v * v * v))));
    }
}

// x += y
extern "C" __global__ void add_assign(h16* x, const h16* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] = f2h(h2f(x[i]) + h2f(y[i]));
    }
}

// y[r, c] += bias[c]; y: [rows, cols]
extern "C" __global__ void add_bias(h16* y, const h16* bias, long long rows, int cols) {
    const long long n = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = f2h(h2f(y[i]) + h2f(bias[i % cols]));
    }
}
