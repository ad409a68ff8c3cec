//! The GPU half of decoding: of a run's raw output, only the rows that can
//! yield a detection come back to the host (issue 21).
//!
//! nanodet-plus-m_320's output is 2,125 rows of 112 floats, about 950 KB an
//! image; at batch 32 that copy alone is 30 MB a run. The rows whose best
//! class score is above the score threshold are the only ones the host
//! decode reads (`Layout::decode_rows`), typically a few dozen. The kernel
//! (`gather.cu`) keeps up to [`ROWS_PER_IMAGE`] of them per image; the host
//! copies the counts, then just those rows, and decodes them into the same
//! candidates, in the same order, as from the whole output. A run where an
//! image kept more (a very low threshold, a pathological frame) is copied
//! whole instead, so the detections never depend on the bound.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::{BackendError, BatchOutputs, GatherPlan};
use crate::gpu::{Gpu, GpuError};

const SOURCE: &str = include_str!("gather.cu");
const KERNEL: &str = "gather_candidate_rows";

/// Rows kept per image at most: 512 rows of nanodet-plus-m's 112 floats
/// are 229 KB, a quarter of its whole output (the buffers for
/// `max_batch = 128` are 29 MB on each side). At the live threshold (0.35)
/// the sample photos keep 23 to 149 rows, at the evaluation threshold
/// (0.05) 313 to 1,238 (`real_models.rs` prints them): a crowd at 0.35
/// fits, an evaluation run comes back whole.
pub const ROWS_PER_IMAGE: usize = 512;

/// Threads per block: 8 warps, one prior each.
const BLOCK: u32 = 256;

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> BackendError {
    move |e| BackendError::run(GpuError::driver(what)(e))
}

fn as_u32(value: usize, what: &str) -> Result<u32, BackendError> {
    u32::try_from(value).map_err(|_| BackendError::run(format!("{what} {value} exceeds u32")))
}

/// The kernel and its buffers, sized for `max_images` images.
pub(crate) struct RowGather {
    plan: GatherPlan,
    gpu: Arc<Gpu>,
    kernel: CudaFunction,
    max_images: usize,
    counts: CudaSlice<u32>,
    picked: CudaSlice<u32>,
    rows: CudaSlice<f32>,
    host_counts: PinnedHostSlice<u32>,
    host_picked: PinnedHostSlice<u32>,
    host_rows: PinnedHostSlice<f32>,
    counts_read: Vec<u32>,
    /// Runs copied whole because an image kept more than the bound.
    overflowed: u64,
}

impl RowGather {
    /// Compiles the kernel and allocates its buffers on `gpu`.
    #[allow(unsafe_code)]
    pub(crate) fn new(
        gpu: Arc<Gpu>,
        plan: GatherPlan,
        max_images: usize,
    ) -> Result<RowGather, BackendError> {
        let fits = plan.priors > 0
            && plan.classes > 0
            && plan
                .score_first
                .checked_add(plan.classes)
                .is_some_and(|end| end <= plan.columns);
        let rows = max_images
            .checked_mul(ROWS_PER_IMAGE)
            .and_then(|rows| rows.checked_mul(plan.columns));
        let (true, Some(rows), Some(_)) = (fits, rows, max_images.checked_mul(plan.priors)) else {
            return Err(BackendError::run(format!(
                "a row gather of {plan:?} for {max_images} images does not fit"
            )));
        };
        let picked = max_images * ROWS_PER_IMAGE;
        let kernel = gpu.compile(KERNEL, SOURCE).map_err(BackendError::run)?;
        let stream = gpu.stream().clone();
        let context = gpu.context().clone();
        let alloc = driver("allocating the row gather's buffers");
        let pinned_u32 = |len: usize| {
            // SAFETY: the host reads only what a device-to-host copy
            // filled. Not write-combined: the CPU reads it.
            unsafe { context.alloc_pinned_with_flags::<u32>(len, 0) }
        };
        let host_counts = pinned_u32(max_images).map_err(&alloc)?;
        let host_picked = pinned_u32(picked).map_err(&alloc)?;
        // SAFETY: as above.
        let host_rows =
            unsafe { context.alloc_pinned_with_flags::<f32>(rows, 0) }.map_err(&alloc)?;
        Ok(RowGather {
            plan,
            kernel,
            max_images,
            counts: stream.alloc_zeros::<u32>(max_images).map_err(&alloc)?,
            picked: stream.alloc_zeros::<u32>(picked).map_err(&alloc)?,
            rows: stream.alloc_zeros::<f32>(rows).map_err(&alloc)?,
            host_counts,
            host_picked,
            host_rows,
            counts_read: Vec::with_capacity(max_images),
            overflowed: 0,
            gpu,
        })
    }

    /// The plan this gather carries out.
    pub(crate) fn plan(&self) -> &GatherPlan {
        &self.plan
    }

    /// What a device session's `gather_rows` does with its `gather`:
    /// clears it for `None`; keeps it for the plan it already carries
    /// out; otherwise makes one for `plan`, where `image_values(output)`
    /// (one image's values of an output, `None` past the outputs) is the
    /// plan's rows times columns. Answers whether the session now does
    /// what was asked: `true` for `None` (everything comes back), and for a
    /// plan whether its rows are gathered. A plan that does not fit leaves
    /// no gather behind.
    pub(crate) fn replan(
        gather: &mut Option<RowGather>,
        plan: Option<GatherPlan>,
        image_values: impl Fn(usize) -> Option<usize>,
        gpu: &Arc<Gpu>,
        max_images: usize,
    ) -> Result<bool, BackendError> {
        let Some(plan) = plan else {
            *gather = None;
            return Ok(true);
        };
        if gather.as_ref().is_some_and(|g| g.plan == plan) {
            return Ok(true);
        }
        *gather = None;
        if image_values(plan.output)
            .is_none_or(|n| plan.priors.checked_mul(plan.columns) != Some(n))
        {
            return Ok(false);
        }
        *gather = Some(RowGather::new(gpu.clone(), plan, max_images)?);
        Ok(true)
    }

    /// Keeps the rows of `images` images of the output at `output` (each
    /// `plan.priors * plan.columns` floats, image after image), on the
    /// GPU's stream after whatever wrote it, and puts them in `results`.
    /// `Ok(false)`: an image kept more than [`ROWS_PER_IMAGE`] rows and
    /// nothing was put; the caller copies the output whole.
    #[allow(unsafe_code)]
    pub(crate) fn gather(
        &mut self,
        output: CUdeviceptr,
        images: usize,
        results: &mut BatchOutputs,
    ) -> Result<bool, BackendError> {
        if images == 0 || images > self.max_images {
            return Err(BackendError::run(format!(
                "a row gather of {images} images, made for 1 to {}",
                self.max_images
            )));
        }
        let plan = self.plan;
        let stream = self.gpu.stream().clone();
        let warps = images * plan.priors;
        let blocks = as_u32(warps.div_ceil((BLOCK / 32) as usize), "blocks")?;
        let (images32, priors, columns) = (
            as_u32(images, "images")?,
            as_u32(plan.priors, "priors")?,
            as_u32(plan.columns, "columns")?,
        );
        let (score_first, classes, capacity) = (
            as_u32(plan.score_first, "score column")?,
            as_u32(plan.classes, "classes")?,
            as_u32(ROWS_PER_IMAGE, "capacity")?,
        );
        stream
            .memset_zeros(&mut self.counts)
            .map_err(driver("clearing the row counts"))?;
        let mut launch = stream.launch_builder(&self.kernel);
        launch
            .arg(&output)
            .arg(&images32)
            .arg(&priors)
            .arg(&columns)
            .arg(&score_first)
            .arg(&classes)
            .arg(&plan.threshold)
            .arg(&capacity)
            .arg(&mut self.counts)
            .arg(&mut self.picked)
            .arg(&mut self.rows);
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match gather_candidate_rows's parameters in
        // type and order. The caller's output holds `images * priors *
        // columns` floats (checked against the engine's output shape when
        // the plan was taken); counts holds max_images, picked
        // max_images * capacity and rows that times columns, and
        // images <= max_images.
        unsafe { launch.launch(config) }.map_err(driver("launching the row gather"))?;

        let copy = driver("copying the row counts");
        let host_counts = self.host_counts.as_mut_slice().map_err(&copy)?;
        let (counts, _counts_guard) = self.counts.device_ptr(&stream);
        // SAFETY: `counts` holds max_images >= images u32.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut host_counts[..images],
                counts,
                stream.cu_stream(),
            )
        }
        .map_err(&copy)?;
        stream.synchronize().map_err(&copy)?;
        self.counts_read.clear();
        self.counts_read
            .extend_from_slice(&self.host_counts.as_slice().map_err(&copy)?[..images]);
        if self
            .counts_read
            .iter()
            .any(|&count| count as usize > ROWS_PER_IMAGE)
        {
            self.overflowed += 1;
            if self.overflowed.is_power_of_two() {
                log::info!(
                    "an image kept more than {ROWS_PER_IMAGE} rows above the score threshold {}: \
                     its batch's outputs were copied whole ({} such runs so far)",
                    plan.threshold,
                    self.overflowed
                );
            }
            return Ok(false);
        }

        let copy = driver("copying the kept rows");
        let (picked, _picked_read) = self.picked.device_ptr(&stream);
        let (rows, _rows_read) = self.rows.device_ptr(&stream);
        let host_picked = self.host_picked.as_mut_slice().map_err(&copy)?;
        // SAFETY: picked holds max_images * capacity u32.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut host_picked[..images * ROWS_PER_IMAGE],
                picked,
                stream.cu_stream(),
            )
        }
        .map_err(&copy)?;
        let host_rows = self.host_rows.as_mut_slice().map_err(&copy)?;
        let per_image = ROWS_PER_IMAGE * plan.columns;
        for (image, &count) in self.counts_read.iter().enumerate() {
            let len = count as usize * plan.columns;
            if len == 0 {
                continue;
            }
            let first = image * per_image;
            let from = rows + (first * size_of::<f32>()) as CUdeviceptr;
            // SAFETY: rows holds max_images * per_image floats; this image's
            // `len <= per_image` start at `first`.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut host_rows[first..first + len],
                    from,
                    stream.cu_stream(),
                )
            }
            .map_err(&copy)?;
        }
        stream.synchronize().map_err(&copy)?;
        results.set_gathered(
            &plan,
            ROWS_PER_IMAGE,
            &self.counts_read,
            self.host_picked.as_slice().map_err(&copy)?,
            self.host_rows.as_slice().map_err(&copy)?,
        )?;
        Ok(true)
    }
}
