// The whole of nanodetd's preprocessing as one CUDA kernel, compiled by
// NVRTC at start: camera pixels (packed BGR/RGB/gray, YUYV, UYVY or NV12) →
// the CPU path's fixed-point bilinear warp → per-plane normalisation →
// CHW f32 or f16, written straight into the engine's input buffer.
//
// It reproduces src/preprocess/mod.rs bit for bit rather than
// approximately: the taps (source index and 1/32 weights) come from the
// host, computed by the same Rust code the CPU path uses; the YCbCr
// conversion is pixels's integer formula; the blend is the same
// integer arithmetic; and the normalisation is one IEEE subtract and
// divide (NVRTC defaults to --prec-div=true and no fast math).

#define FORMAT_BGR 0
#define FORMAT_RGB 1
#define FORMAT_GRAY 2
#define FORMAT_YUYV 3
#define FORMAT_NV12 4
#define FORMAT_UYVY 5

__device__ __forceinline__ unsigned char clip8(int v)
{
    v = (v + 128) >> 8;
    return (unsigned char) (v < 0 ? 0 : (v > 255 ? 255 : v));
}

// BT.601 limited range, as pixels::ycbcr_to_bgr.
__device__ __forceinline__ uchar3 ycbcr_to_bgr(int y, int cb, int cr)
{
    int c = 298 * (y - 16);
    int d = cb - 128;
    int e = cr - 128;
    return make_uchar3(clip8(c + 516 * d), clip8(c - 100 * d - 208 * e), clip8(c + 409 * e));
}

// The frame's channels 0, 1, 2 at (x, y), in the frame's own order (B, G,
// R for YUV sources; a gray value three times).
__device__ __forceinline__ uchar3 fetch(
    const unsigned char* src, int format, int stride, int height, int x, int y)
{
    const unsigned char* row = src + (size_t) y * stride;
    switch (format) {
    case FORMAT_GRAY: {
        unsigned char v = row[x];
        return make_uchar3(v, v, v);
    }
    case FORMAT_YUYV: {
        const unsigned char* pair = row + (x / 2) * 4;
        return ycbcr_to_bgr((x & 1) ? pair[2] : pair[0], pair[1], pair[3]);
    }
    case FORMAT_UYVY: {
        const unsigned char* pair = row + (x / 2) * 4;
        return ycbcr_to_bgr((x & 1) ? pair[3] : pair[1], pair[0], pair[2]);
    }
    case FORMAT_NV12: {
        const unsigned char* uv = src + (size_t) stride * height + (size_t) (y / 2) * stride + (x / 2) * 2;
        return ycbcr_to_bgr(row[x], uv[0], uv[1]);
    }
    default: {
        const unsigned char* p = row + x * 3;
        return make_uchar3(p[0], p[1], p[2]);
    }
    }
}

__device__ __forceinline__ unsigned int channel(uchar3 v, int c)
{
    return c == 0 ? v.x : (c == 1 ? v.y : v.z);
}

// f32 → f16 bits, round to nearest even, without cuda_fp16.h (which NVRTC
// does not always ship).
__device__ __forceinline__ unsigned short to_half(float f)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// taps: for each output column then each output row, three ints: the
// first source index (the second is the next), and the two weights in
// 1/32. Plane p is frame channel c<p>, normalised with m<p> and s<p>.
extern "C" __global__ void warp_normalise(
    const unsigned char* src, int format, int src_stride, int src_height,
    const int* taps, int out_width, int out_height,
    float m0, float m1, float m2, float s0, float s1, float s2,
    int c0, int c1, int c2, int half, void* out)
{
    int ox = blockIdx.x * blockDim.x + threadIdx.x;
    int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= out_width || oy >= out_height) {
        return;
    }
    const int* col = taps + 3 * ox;
    const int* row = taps + 3 * (out_width + oy);
    int x0 = col[0], y0 = row[0];
    unsigned int wx0 = col[1], wx1 = col[2], wy0 = row[1], wy1 = row[2];

    uchar3 tl = fetch(src, format, src_stride, src_height, x0, y0);
    uchar3 tr = fetch(src, format, src_stride, src_height, x0 + 1, y0);
    uchar3 bl = fetch(src, format, src_stride, src_height, x0, y0 + 1);
    uchar3 br = fetch(src, format, src_stride, src_height, x0 + 1, y0 + 1);

    size_t plane = (size_t) out_width * out_height;
    size_t at = (size_t) oy * out_width + ox;
    int sources[3] = {c0, c1, c2};
    float mean[3] = {m0, m1, m2};
    float std[3] = {s0, s1, s2};
#pragma unroll
    for (int p = 0; p < 3; ++p) {
        int c = sources[p];
        unsigned int upper = channel(tl, c) * wx0 + channel(tr, c) * wx1;
        unsigned int lower = channel(bl, c) * wx0 + channel(br, c) * wx1;
        unsigned int v = (upper * wy0 + lower * wy1 + 512) >> 10;
        float value = ((float) (v & 255) - mean[p]) / std[p];
        if (half) {
            ((unsigned short*) out)[p * plane + at] = to_half(value);
        } else {
            ((float*) out)[p * plane + at] = value;
        }
    }
}
