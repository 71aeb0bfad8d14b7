// Row gathers and column slices. One block per output row, threads over columns.

// out[r] = table[ids[r]]; table: [vocab, dim], out: [rows, dim]
extern "C" __global__ void embed(const h16* table, const unsigned int* ids, h16* out, int dim) {
    const long long r = blockIdx.x;
    const h16* src = table + (long long)ids[r] * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) out[r * dim + c] = src[c];
}

// x[r] += table[pos[r]]; x: [rows, cols], table: [positions, cols]
extern "C" __global__ void add_positions(h16* x, const h16* table, const int* pos, int cols) {
    const long long r = blockIdx.x;
    const h16* t = table + (long long)pos[r] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        x[r * cols + c] = f2h(h2f(x[r * cols + c]) + h2f(t[c]));
    }
}

// out[i] = x[idx[i]]; rows of `cols` values
extern "C" __global__ void select_rows(const h16* x, const int* idx, h16* out, int cols) {
    const long long i = blockIdx.x;
    const h16* src = x + (long long)idx[i] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[i * cols + c] = src[c];
}

// out[r, c] = x[r, start + c]; x: [rows, cols], out: [rows, width]
extern "C" __global__ void split_cols(const h16* x, h16* out, int cols, int start, int width) {
    const long long r = blockIdx.x;
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[r * width + c] = x[r * cols + start + c];
}
