//! [`preprocess_into`](super::preprocess_into) on a CUDA device, as one
//! kernel (`warp.cu`) compiled by NVRTC when the preprocessor is made.
//!
//! The camera's bytes go into pinned host memory, one asynchronous copy
//! takes them to the device, and the kernel converts, warps and
//! normalises them straight into the engine's input buffer, on the GPU's
//! stream, so TensorRT's enqueue on that stream follows with no sync in
//! between. The taps come from the same Rust code as the CPU path's, so
//! both paths give the same values (tests/integration/gpu.rs checks this on a GPU).

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaViewMut, DeviceRepr, HostSlice, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};

use super::{ChannelOrder, PreprocessSpec, ResizeMode, Transform, UPLOAD_SLOTS, placement, taps};
use crate::buffer::BufferLease;
use crate::frame::{Frame, FrameError, PixelFormat};
use crate::gpu::{Gpu, GpuError};
use crate::pixels::{BufferLayout, CameraFormat};

const KERNEL: &str = "warp_normalise";
const SOURCE: &str = include_str!("warp.cu");

/// Camera pixels, as the kernel can read them.
#[derive(Debug, Clone, Copy)]
pub enum CameraImage<'a> {
    /// A decoded frame: image files, MJPEG, anything converted on the CPU.
    Frame(&'a Frame),
    /// A raw V4L2 buffer (YUYV, NV12, GREY, RGB24, BGR24), converted on the
    /// GPU. MJPEG must be decoded to a [`Frame`] first.
    Raw {
        /// The buffer's geometry.
        layout: BufferLayout,
        /// The buffer.
        bytes: &'a [u8],
        /// Names the frame in errors (camera and sequence number).
        origin: &'a str,
    },
}

/// Why a frame could not be preprocessed on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuPreprocessError {
    /// The device failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The buffer does not hold the frame its layout describes.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The kernel does not take this input; the CPU path does.
    #[error("{origin}: {reason}")]
    Unsupported {
        /// The frame.
        origin: String,
        /// What the kernel cannot take.
        reason: String,
    },
    /// The output buffer does not hold exactly one input tensor.
    #[error("device input buffer holds {got} values, the {width}x{height} input needs {needed}")]
    BufferSize {
        /// Values in the buffer.
        got: usize,
        /// Values needed.
        needed: usize,
        /// Input width.
        width: usize,
        /// Input height.
        height: usize,
    },
    /// [`GpuPreprocessor::launch`] was called before any frame was staged.
    #[error("no frame has been staged on the device")]
    NothingStaged,
    /// An upload slot past [`UPLOAD_SLOTS`].
    #[error("upload slot {slot} does not exist: there are {UPLOAD_SLOTS}")]
    NoSuchSlot {
        /// The slot asked for.
        slot: usize,
    },
}

/// Element types the kernel writes: `f32`, or `u16` holding f16 bits
/// (for engines whose input binding is half precision).
pub trait InputElement: DeviceRepr {
    /// Whether the kernel writes f16.
    const HALF: bool;
}

impl InputElement for f32 {
    const HALF: bool = false;
}

impl InputElement for u16 {
    const HALF: bool = true;
}

/// The pixel layout codes `warp.cu` switches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceFormat {
    Bgr = 0,
    Rgb = 1,
    Gray = 2,
    Yuyv = 3,
    Nv12 = 4,
    Uyvy = 5,
}

/// What is on the device now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Staged {
    format: SourceFormat,
    width: usize,
    height: usize,
    stride: usize,
}

/// The frame size and spec the uploaded taps were made for.
#[derive(Debug, Clone, PartialEq)]
struct TapsFor {
    width: usize,
    height: usize,
    out_width: usize,
    out_height: usize,
    resize: ResizeMode,
}

/// A frame's buffer on the device, and what is in it.
#[derive(Debug, Default)]
struct DeviceFrame {
    buffer: Option<CudaSlice<u8>>,
    staged: Option<Staged>,
}

/// Which device frame a kernel reads.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The one staged on the GPU's stream for the next launch.
    Staged,
    /// One uploaded ahead on the upload stream, by slot.
    Uploaded(usize),
}

/// The GPU preprocessing of one pipeline thread: the compiled kernel and
/// its staging buffers, reused from frame to frame.
pub struct GpuPreprocessor {
    gpu: Arc<Gpu>,
    kernel: CudaFunction,
    staging: Option<PinnedHostSlice<u8>>,
    /// The frame [`stage`](Self::stage) and its kin put on the device.
    next: DeviceFrame,
    /// Frames [`upload_lent`](Self::upload_lent) put there, by slot.
    uploaded: Vec<DeviceFrame>,
    taps: Option<(TapsFor, CudaSlice<i32>)>,
    /// Set once page-locking a capture buffer failed (and was logged).
    pin_refused: bool,
}

impl GpuPreprocessor {
    /// Compiles the kernel for `gpu`.
    pub fn new(gpu: Arc<Gpu>) -> Result<GpuPreprocessor, GpuError> {
        let kernel = gpu.compile(KERNEL, SOURCE)?;
        Ok(GpuPreprocessor {
            gpu,
            kernel,
            staging: None,
            next: DeviceFrame::default(),
            uploaded: Vec::new(),
            taps: None,
            pin_refused: false,
        })
    }

    /// The device this preprocessor runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Copies `image` into pinned memory and queues its upload.
    #[allow(unsafe_code)]
    pub fn stage(&mut self, image: CameraImage<'_>) -> Result<(), GpuPreprocessError> {
        let (staged, bytes) = layout_of(image)?;
        let staging = match self.staging.as_mut() {
            Some(staging) if staging.len() == bytes.len() => staging,
            _ => {
                // SAFETY: filled completely (below) before anything reads
                // it.
                let staging = unsafe { self.gpu.context().alloc_pinned::<u8>(bytes.len()) }
                    .map_err(GpuError::driver("allocating pinned staging memory"))?;
                self.staging.insert(staging)
            }
        };
        // Waits for the previous upload from this staging buffer to finish.
        staging
            .as_mut_slice()
            .map_err(GpuError::driver("waiting for the staging buffer"))?
            .copy_from_slice(bytes);
        upload(self.gpu.stream(), &mut self.next.buffer, staging)?;
        self.next.staged = Some(staged);
        Ok(())
    }

    /// Queues the upload of a raw camera buffer the caller holds in pinned
    /// memory already (a frame captured into it, or registered with the
    /// driver): no copy on the host at all.
    pub fn stage_pinned(
        &mut self,
        layout: BufferLayout,
        pinned: &PinnedHostSlice<u8>,
        origin: &str,
    ) -> Result<(), GpuPreprocessError> {
        let (staged, bytes) = layout_of(CameraImage::Raw {
            layout,
            bytes: pinned
                .as_slice()
                .map_err(GpuError::driver("waiting for the pinned frame"))?,
            origin,
        })?;
        if bytes.len() != pinned.len() {
            return Err(GpuPreprocessError::Unsupported {
                origin: origin.to_owned(),
                reason: format!(
                    "the pinned buffer holds {} bytes, the {}x{} frame {}",
                    pinned.len(),
                    layout.width,
                    layout.height,
                    bytes.len()
                ),
            });
        }
        upload(self.gpu.stream(), &mut self.next.buffer, pinned)?;
        self.next.staged = Some(staged);
        Ok(())
    }

    /// Queues the upload of a USERPTR capture buffer straight from the
    /// buffer, page-locking it on its first visit: no copy on the host.
    /// The upload runs asynchronously: the caller keeps the lease until it
    /// has waited for the frame's inference (the detector's postprocess
    /// does), so the camera cannot refill the buffer under the copy.
    pub fn stage_lent(
        &mut self,
        layout: BufferLayout,
        lease: &BufferLease,
        origin: &str,
    ) -> Result<(), GpuPreprocessError> {
        let (staged, bytes) = self.lent_frame(layout, lease, origin)?;
        upload(self.gpu.stream(), &mut self.next.buffer, bytes)?;
        self.next.staged = Some(staged);
        Ok(())
    }

    /// Queues the upload of a USERPTR capture buffer into upload `slot`
    /// on the upload stream, ahead of its run: the copy overlaps whatever
    /// the GPU's stream runs until [`launch_uploaded`](Self::launch_uploaded)
    /// reads it. The upload waits for the last kernel that read the slot.
    /// The caller keeps the lease until a wait on the GPU's stream after
    /// that launch, or until [`wait_for_uploads`](Self::wait_for_uploads).
    pub fn upload_lent(
        &mut self,
        slot: usize,
        layout: BufferLayout,
        lease: &BufferLease,
        origin: &str,
    ) -> Result<(), GpuPreprocessError> {
        if slot >= UPLOAD_SLOTS {
            return Err(GpuPreprocessError::NoSuchSlot { slot });
        }
        let (staged, bytes) = self.lent_frame(layout, lease, origin)?;
        if self.uploaded.len() <= slot {
            self.uploaded.resize_with(slot + 1, DeviceFrame::default);
        }
        let frame = &mut self.uploaded[slot];
        // Forgotten first: a failed upload leaves nothing to launch.
        frame.staged = None;
        upload(self.gpu.uploads(), &mut frame.buffer, bytes)?;
        frame.staged = Some(staged);
        Ok(())
    }

    /// Waits until every upload queued ahead has ended, so the leases they
    /// read can go back to their cameras.
    pub fn wait_for_uploads(&self) -> Result<(), GpuError> {
        self.gpu
            .uploads()
            .synchronize()
            .map_err(GpuError::driver("waiting for the uploads"))
    }

    /// A lent buffer's bytes as the kernel reads them, page-locked on its
    /// first visit.
    fn lent_frame<'a>(
        &mut self,
        layout: BufferLayout,
        lease: &'a BufferLease,
        origin: &'a str,
    ) -> Result<(Staged, &'a [u8]), GpuPreprocessError> {
        if !self.pin_refused
            && let Err(e) = self.gpu.pin_capture_buffer(lease.buffer())
        {
            // Pageable memory still uploads, through the driver's own
            // staging: slower, and never wrong.
            log::warn!("{origin}: {e}; capture buffers are uploaded unlocked");
            self.pin_refused = true;
        }
        layout_of(CameraImage::Raw {
            layout,
            bytes: lease.bytes(),
            origin,
        })
    }

    /// Queues the kernel on the staged frame, writing one CHW tensor into
    /// `out`, and returns the transform back to frame pixels.
    pub fn launch<T: InputElement>(
        &mut self,
        spec: &PreprocessSpec,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<Transform, GpuPreprocessError> {
        self.launch_from(Source::Staged, spec, out)
    }

    /// [`launch`](Self::launch) on the frame uploaded into `slot`.
    pub fn launch_uploaded<T: InputElement>(
        &mut self,
        slot: usize,
        spec: &PreprocessSpec,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<Transform, GpuPreprocessError> {
        self.launch_from(Source::Uploaded(slot), spec, out)
    }

    #[allow(unsafe_code)]
    fn launch_from<T: InputElement>(
        &mut self,
        from: Source,
        spec: &PreprocessSpec,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<Transform, GpuPreprocessError> {
        let frame = match from {
            Source::Staged => &self.next,
            Source::Uploaded(slot) => self
                .uploaded
                .get(slot)
                .ok_or(GpuPreprocessError::NothingStaged)?,
        };
        let staged = frame.staged.ok_or(GpuPreprocessError::NothingStaged)?;
        if out.len() != spec.tensor_len() {
            return Err(GpuPreprocessError::BufferSize {
                got: out.len(),
                needed: spec.tensor_len(),
                width: spec.width,
                height: spec.height,
            });
        }
        let transform = placement(staged.width, staged.height, spec);
        let stream = self.gpu.stream().clone();
        let wanted = TapsFor {
            width: staged.width,
            height: staged.height,
            out_width: spec.width,
            out_height: spec.height,
            resize: spec.resize,
        };
        let taps = match &self.taps {
            Some((made_for, taps)) if *made_for == wanted => taps,
            _ => {
                let host = host_taps(&transform, staged, spec);
                let device = stream
                    .clone_htod(&host)
                    .map_err(GpuError::driver("uploading the resize taps"))?;
                &self.taps.insert((wanted, device)).1
            }
        };
        let Some(source) = frame.buffer.as_ref() else {
            return Err(GpuPreprocessError::NothingStaged);
        };

        let [c0, c1, c2] = plane_sources(staged.format, spec.channel_order);
        let [m0, m1, m2] = spec.mean;
        let [s0, s1, s2] = spec.std;
        let format = staged.format as i32;
        let (stride, height) = (as_int(staged.stride)?, as_int(staged.height)?);
        let (out_width, out_height) = (as_int(spec.width)?, as_int(spec.height)?);
        let half = i32::from(T::HALF);
        // 32 wide so a warp writes 128 contiguous bytes of one plane row.
        let config = LaunchConfig {
            grid_dim: (
                spec.width.div_ceil(32) as u32,
                spec.height.div_ceil(8) as u32,
                1,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&self.kernel);
        launch
            .arg(source)
            .arg(&format)
            .arg(&stride)
            .arg(&height)
            .arg(taps)
            .arg(&out_width)
            .arg(&out_height)
            .arg(&m0)
            .arg(&m1)
            .arg(&m2)
            .arg(&s0)
            .arg(&s1)
            .arg(&s2)
            .arg(&c0)
            .arg(&c1)
            .arg(&c2)
            .arg(&half)
            .arg(out);
        // SAFETY: the arguments match warp_normalise's parameters in type
        // and order; `source` holds `stride * height` bytes (plus the NV12
        // chroma), checked when staged; every tap index is within the
        // frame (taps() keeps `first` one short of the edge); `out` holds
        // exactly 3 * out_width * out_height elements, checked above.
        unsafe { launch.launch(config) }.map_err(GpuError::driver("launching the kernel"))?;
        // As for an upload: a kernel that did not wait for its frame's
        // upload is an error.
        stream.context().check_err().map_err(GpuError::driver(
            "ordering the kernel after its frame's upload",
        ))?;
        Ok(transform)
    }

    /// [`stage`](Self::stage) then [`launch`](Self::launch).
    pub fn preprocess<T: InputElement>(
        &mut self,
        image: CameraImage<'_>,
        spec: &PreprocessSpec,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<Transform, GpuPreprocessError> {
        self.stage(image)?;
        self.launch(spec, out)
    }
}

/// Queues the copy of `pinned` (exactly the staged frame's bytes) on
/// `stream` into the device frame buffer `source`, made or remade when it
/// is too small for it. A larger buffer is kept: cameras of several sizes
/// take turns in a batch's slots.
#[allow(unsafe_code)]
fn upload<Host: HostSlice<u8> + ?Sized>(
    stream: &Arc<CudaStream>,
    source: &mut Option<CudaSlice<u8>>,
    pinned: &Host,
) -> Result<(), GpuError> {
    let len = pinned.len();
    let source = match source {
        Some(source) if source.len() >= len => source,
        _ => {
            // SAFETY: the copy below fills the `len` bytes the kernel
            // reads before it reads them (same stream, or cudarc's events
            // across streams).
            let buffer = unsafe { stream.alloc::<u8>(len) }
                .map_err(GpuError::driver("allocating the frame buffer"))?;
            source.insert(buffer)
        }
    };
    stream
        .memcpy_htod(pinned, &mut source.slice_mut(..len))
        .map_err(GpuError::driver("copying the frame to the device"))?;
    // cudarc keeps a failed wait on another stream's event (the last
    // kernel that read this buffer) to itself: an upload that did not wait
    // is an error here, not pixels overwritten under a kernel.
    stream.context().check_err().map_err(GpuError::driver(
        "ordering the upload after the buffer's last read",
    ))
}

fn as_int(value: usize) -> Result<i32, GpuPreprocessError> {
    i32::try_from(value).map_err(|_| GpuPreprocessError::Unsupported {
        origin: "frame".into(),
        reason: format!("dimension {value} is too large"),
    })
}

/// The kernel's view of `image`, and the bytes to upload.
fn layout_of(image: CameraImage<'_>) -> Result<(Staged, &[u8]), GpuPreprocessError> {
    let unsupported = |origin: &str, reason: &str| GpuPreprocessError::Unsupported {
        origin: origin.to_owned(),
        reason: reason.to_owned(),
    };
    let (staged, bytes, origin) = match image {
        CameraImage::Frame(frame) => {
            let format = match frame.format() {
                PixelFormat::Bgr8 => SourceFormat::Bgr,
                PixelFormat::Rgb8 => SourceFormat::Rgb,
                PixelFormat::Gray8 => SourceFormat::Gray,
            };
            let staged = Staged {
                format,
                width: frame.width(),
                height: frame.height(),
                stride: frame.width() * frame.format().channels(),
            };
            (staged, frame.data(), "frame")
        }
        CameraImage::Raw {
            layout,
            bytes,
            origin,
        } => {
            let format = match layout.format {
                CameraFormat::Bgr24 => SourceFormat::Bgr,
                CameraFormat::Rgb24 => SourceFormat::Rgb,
                CameraFormat::Grey => SourceFormat::Gray,
                CameraFormat::Yuyv => SourceFormat::Yuyv,
                CameraFormat::Uyvy => SourceFormat::Uyvy,
                CameraFormat::Nv12 => SourceFormat::Nv12,
                CameraFormat::Mjpeg => {
                    return Err(unsupported(
                        origin,
                        "MJPEG is decoded on the CPU; pass the decoded frame",
                    ));
                }
            };
            layout.check(bytes.len(), origin)?;
            let staged = Staged {
                format,
                width: layout.width,
                height: layout.height,
                stride: layout.bytes_per_line,
            };
            (staged, &bytes[..layout.needed()], origin)
        }
    };
    // The CPU path pads such frames to 2x2 first; cameras never send them.
    if staged.width < 2 || staged.height < 2 {
        return Err(unsupported(
            origin,
            "frames under 2x2 pixels take the CPU path",
        ));
    }
    Ok((staged, bytes))
}

/// Which frame channel feeds each plane: the frame's own order, reversed
/// when the network wants the other one. YCbCr sources convert to BGR.
fn plane_sources(format: SourceFormat, order: ChannelOrder) -> [i32; 3] {
    let frame_is_bgr = match format {
        SourceFormat::Gray => return [0, 1, 2],
        SourceFormat::Rgb => false,
        SourceFormat::Bgr | SourceFormat::Yuyv | SourceFormat::Uyvy | SourceFormat::Nv12 => true,
    };
    if frame_is_bgr == (order == ChannelOrder::Bgr) {
        [0, 1, 2]
    } else {
        [2, 1, 0]
    }
}

/// Columns then rows, three ints each: first source index, two weights.
fn host_taps(transform: &Transform, staged: Staged, spec: &PreprocessSpec) -> Vec<i32> {
    let columns = taps(
        spec.width,
        staged.width,
        f64::from(transform.scale_x),
        f64::from(transform.pad_x),
    );
    let rows = taps(
        spec.height,
        staged.height,
        f64::from(transform.scale_y),
        f64::from(transform.pad_y),
    );
    columns
        .chain(rows)
        .flat_map(|t| {
            [
                t.first as i32,
                t.weight_first as i32,
                t.weight_second as i32,
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_follow_the_network_order() {
        assert_eq!(
            plane_sources(SourceFormat::Yuyv, ChannelOrder::Bgr),
            [0, 1, 2]
        );
        assert_eq!(
            plane_sources(SourceFormat::Rgb, ChannelOrder::Bgr),
            [2, 1, 0]
        );
        assert_eq!(
            plane_sources(SourceFormat::Nv12, ChannelOrder::Rgb),
            [2, 1, 0]
        );
        assert_eq!(
            plane_sources(SourceFormat::Gray, ChannelOrder::Rgb),
            [0, 1, 2]
        );
    }

    #[test]
    fn mjpeg_and_short_buffers_are_refused_before_any_gpu_work() {
        let layout = BufferLayout {
            format: CameraFormat::Yuyv,
            width: 4,
            height: 2,
            bytes_per_line: 8,
        };
        let short = layout_of(CameraImage::Raw {
            layout,
            bytes: &[0; 10],
            origin: "cam0 #7",
        });
        assert!(
            matches!(&short, Err(GpuPreprocessError::Frame(e)) if e.to_string().contains("cam0 #7")),
            "{short:?}"
        );
        let mjpeg = layout_of(CameraImage::Raw {
            layout: BufferLayout {
                format: CameraFormat::Mjpeg,
                ..layout
            },
            bytes: &[0; 16],
            origin: "cam0 #8",
        });
        assert!(
            matches!(mjpeg, Err(GpuPreprocessError::Unsupported { .. })),
            "{mjpeg:?}"
        );
    }
}
