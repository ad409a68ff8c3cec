// The GPU half of decoding (issue 21): of a batch's single output, rows of
// `columns` floats per prior (class scores from `score_first`, then the box),
// keep the rows of the priors whose best class score is above `threshold`.
// Only those can yield a candidate (model/decode.rs), and they are a few
// dozen of 2,125 rows, so the host copies kilobytes instead of the whole
// ~950 KB output of each image.
//
// One warp per prior: its lanes read the class scores side by side
// (coalesced), reduce them to the best, and copy the row together. The
// order rows land in is the order their atomics ran; the host sorts them
// back by prior, so what it decodes is exactly what the host decode reads.
// `counts[image]` may end above `capacity`: the rows past it are not
// written, and the host then copies that batch whole.
//
// fmaxf, like Rust's f32::max that the host decode folds with, returns the
// other operand when one is NaN, and the best of any order is the same
// value: the comparison with the threshold is the host's, bit for bit.

extern "C" __global__ void gather_candidate_rows(
    const float* outputs,
    unsigned int images,
    unsigned int priors,
    unsigned int columns,
    unsigned int score_first,
    unsigned int classes,
    float threshold,
    unsigned int capacity,
    unsigned int* counts,
    unsigned int* picked,
    float* rows)
{
    const unsigned long long warp =
        ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const unsigned int lane = threadIdx.x % 32;
    // The same for every lane of a warp: whole warps leave together, so the
    // shuffles below always have all 32 lanes.
    if (warp >= (unsigned long long)images * priors) {
        return;
    }
    const unsigned int image = (unsigned int)(warp / priors);
    const unsigned int prior = (unsigned int)(warp % priors);
    const float* row = outputs + warp * columns;
    // Negative infinity: NVRTC has no math.h for INFINITY.
    float best = __int_as_float(0xff800000);
    for (unsigned int c = lane; c < classes; c += 32) {
        best = fmaxf(best, row[score_first + c]);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, offset));
    }
    if (!(best > threshold)) {
        return;
    }
    unsigned int slot = 0;
    if (lane == 0) {
        slot = atomicAdd(&counts[image], 1u);
    }
    slot = __shfl_sync(0xffffffffu, slot, 0);
    if (slot >= capacity) {
        return;
    }
    const unsigned long long at = (unsigned long long)image * capacity + slot;
    if (lane == 0) {
        picked[at] = prior;
    }
    float* to = rows + at * columns;
    for (unsigned int c = lane; c < columns; c += 32) {
        to[c] = row[c];
    }
}
