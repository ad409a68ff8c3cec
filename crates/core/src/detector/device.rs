//! The GPU side of a [`DetectorSession`](super::DetectorSession): a frame goes up once, the
//! preprocessing kernel writes the engine's input in place, and only the
//! outputs come back.
//!
//! This file is the one place where the `cuda` feature gates the detector.
//! Without it, [`DeviceRunner`] is a type with no values: the session's
//! matches on it stay whole, and its arms are empty matches.

#[cfg(feature = "cuda")]
pub(super) use self::cuda::DeviceRunner;
#[cfg(not(feature = "cuda"))]
pub(super) use self::host_only::DeviceRunner;

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::PinnedHostSlice;

    use super::super::{DetectorError, DetectorSession, Runner};
    use crate::backend::{BackendError, BatchOutputs, DeviceSession, Engine, GatherPlan};
    use crate::buffer::RawBytes;
    use crate::frame::Frame;
    use crate::pixels::BufferLayout;
    use crate::preprocess::{
        CameraImage, GpuPreprocessError, GpuPreprocessor, PreprocessSpec, Transform,
    };

    /// A device session and the kernel that feeds it.
    pub struct DeviceRunner {
        session: Box<dyn DeviceSession>,
        // Boxed: one per thread, and it would triple the runner's size.
        preprocessor: Box<GpuPreprocessor>,
    }

    impl DeviceRunner {
        /// A runner where `engine` runs on a GPU; `None` where it runs on
        /// the host.
        pub fn open(engine: &dyn Engine) -> Option<Result<DeviceRunner, DetectorError>> {
            let session = engine.new_device_session()?;
            Some(session.map_err(DetectorError::from).and_then(|session| {
                let preprocessor = GpuPreprocessor::new(session.gpu().clone())
                    .map_err(GpuPreprocessError::from)?;
                Ok(DeviceRunner {
                    session,
                    preprocessor: Box::new(preprocessor),
                })
            }))
        }

        pub fn preprocess_frame(
            &mut self,
            slot: usize,
            frame: &Frame,
            spec: &PreprocessSpec,
        ) -> Result<Transform, DetectorError> {
            self.preprocess(slot, CameraImage::Frame(frame), spec)
        }

        /// A lent buffer is uploaded as it is (page-locked once); any
        /// other is staged through pinned memory.
        pub fn preprocess_raw(
            &mut self,
            slot: usize,
            layout: BufferLayout,
            bytes: &RawBytes,
            origin: &str,
            spec: &PreprocessSpec,
        ) -> Result<Transform, DetectorError> {
            if let RawBytes::Leased(lease) = bytes {
                self.preprocessor.stage_lent(layout, lease, origin)?;
                return self.launch(slot, spec);
            }
            self.preprocess(
                slot,
                CameraImage::Raw {
                    layout,
                    bytes,
                    origin,
                },
                spec,
            )
        }

        fn preprocess(
            &mut self,
            slot: usize,
            image: CameraImage<'_>,
            spec: &PreprocessSpec,
        ) -> Result<Transform, DetectorError> {
            self.preprocessor.stage(image)?;
            self.launch(slot, spec)
        }

        fn preprocess_pinned(
            &mut self,
            slot: usize,
            layout: BufferLayout,
            pinned: &PinnedHostSlice<u8>,
            origin: &str,
            spec: &PreprocessSpec,
        ) -> Result<Transform, DetectorError> {
            self.preprocessor.stage_pinned(layout, pinned, origin)?;
            self.launch(slot, spec)
        }

        /// Queues a lent buffer's upload into upload slot `ahead`, on the
        /// upload stream; `false` for a copied buffer, which
        /// [`preprocess_raw`](Self::preprocess_raw) stages when it runs.
        pub fn upload_ahead(
            &mut self,
            ahead: usize,
            layout: BufferLayout,
            bytes: &RawBytes,
            origin: &str,
        ) -> Result<bool, DetectorError> {
            let RawBytes::Leased(lease) = bytes else {
                return Ok(false);
            };
            self.preprocessor
                .upload_lent(ahead, layout, lease, origin)?;
            Ok(true)
        }

        /// The kernel on the frame in upload slot `ahead`, into image
        /// `slot` of the next run.
        pub fn preprocess_uploaded(
            &mut self,
            ahead: usize,
            slot: usize,
            spec: &PreprocessSpec,
        ) -> Result<Transform, DetectorError> {
            let mut input = input_image(self.session.as_mut(), slot)?;
            Ok(self.preprocessor.launch_uploaded(ahead, spec, &mut input)?)
        }

        /// The kernel on the staged frame, into the engine's input for
        /// image `slot` of the next run.
        fn launch(
            &mut self,
            slot: usize,
            spec: &PreprocessSpec,
        ) -> Result<Transform, DetectorError> {
            let mut input = input_image(self.session.as_mut(), slot)?;
            Ok(self.preprocessor.launch(spec, &mut input)?)
        }

        /// One run over the first `images` slots. A failed run waits for
        /// the stream first: uploads of lent buffers it had queued must
        /// end before the caller hands those buffers back.
        pub fn infer(&mut self, images: usize) -> Result<(), BackendError> {
            let outcome = self.session.run_on_device(images);
            if outcome.is_err()
                && let Err(e) = self.session.gpu().stream().synchronize()
            {
                log::warn!("waiting for the GPU after a failed run: {e}");
            }
            outcome
        }

        /// The most images one run takes.
        pub fn max_images(&self) -> usize {
            self.session.max_images()
        }

        /// Waits for everything queued on the stream and for the uploads
        /// queued ahead (of lent buffers, both).
        pub fn wait(&self) -> Result<(), BackendError> {
            // Both, whatever the first gives: each may hold uploads of
            // lent buffers.
            let run = self.session.gpu().stream().synchronize().map_err(|e| {
                BackendError::run(crate::gpu::GpuError::driver("waiting for the GPU")(e))
            });
            let uploads = self
                .preprocessor
                .wait_for_uploads()
                .map_err(BackendError::run);
            run.and(uploads)
        }

        pub fn outputs(&self) -> &BatchOutputs {
            self.session.outputs()
        }

        pub fn gather_rows(&mut self, plan: Option<GatherPlan>) -> Result<bool, BackendError> {
            self.session.gather_rows(plan)
        }
    }

    /// The engine's input for image `slot` of the next run.
    fn input_image(
        session: &mut dyn DeviceSession,
        slot: usize,
    ) -> Result<cudarc::driver::CudaViewMut<'_, f32>, BackendError> {
        let max = session.max_images();
        session.input_image(slot).ok_or_else(|| {
            BackendError::run(format!(
                "the device session has no input buffer for image {slot} (it takes {max})"
            ))
        })
    }

    /// What only a GPU build offers.
    impl DetectorSession {
        /// Stage 1 from what a camera gives, decoded or raw.
        pub fn preprocess_camera(
            &mut self,
            image: CameraImage<'_>,
        ) -> Result<Transform, DetectorError> {
            match (&mut self.runner, image) {
                (Runner::Device(device), image) => {
                    device.preprocess(0, image, &self.detector.preprocess)
                }
                (Runner::Host { .. }, CameraImage::Frame(frame)) => self.preprocess(frame),
                (
                    Runner::Host { .. },
                    CameraImage::Raw {
                        layout,
                        bytes,
                        origin,
                    },
                ) => self.preprocess_converted(layout, bytes, origin),
            }
        }

        /// Stage 1 from a raw camera buffer the caller holds in pinned
        /// memory: one upload, no host copy (GPU sessions only).
        pub fn preprocess_pinned(
            &mut self,
            layout: BufferLayout,
            pinned: &PinnedHostSlice<u8>,
            origin: &str,
        ) -> Result<Transform, DetectorError> {
            self.preprocess_pinned_into(0, layout, pinned, origin)
        }

        /// [`preprocess_pinned`](Self::preprocess_pinned) into image `slot`
        /// of the next run.
        pub fn preprocess_pinned_into(
            &mut self,
            slot: usize,
            layout: BufferLayout,
            pinned: &PinnedHostSlice<u8>,
            origin: &str,
        ) -> Result<Transform, DetectorError> {
            let Runner::Device(device) = &mut self.runner else {
                return Err(BackendError::NotOnDevice(format!("{origin}: a pinned frame")).into());
            };
            device.preprocess_pinned(slot, layout, pinned, origin, &self.detector.preprocess)
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod host_only {
    use super::super::DetectorError;
    use crate::backend::{BackendError, BatchOutputs, Engine, GatherPlan};
    use crate::buffer::RawBytes;
    use crate::frame::Frame;
    use crate::pixels::BufferLayout;
    use crate::preprocess::{PreprocessSpec, Transform};

    /// No GPU is compiled in: never built.
    pub enum DeviceRunner {}

    impl DeviceRunner {
        pub fn open(_: &dyn Engine) -> Option<Result<DeviceRunner, DetectorError>> {
            None
        }

        pub fn preprocess_frame(
            &mut self,
            _: usize,
            _: &Frame,
            _: &PreprocessSpec,
        ) -> Result<Transform, DetectorError> {
            match *self {}
        }

        pub fn preprocess_raw(
            &mut self,
            _: usize,
            _: BufferLayout,
            _: &RawBytes,
            _: &str,
            _: &PreprocessSpec,
        ) -> Result<Transform, DetectorError> {
            match *self {}
        }

        pub fn upload_ahead(
            &mut self,
            _: usize,
            _: BufferLayout,
            _: &RawBytes,
            _: &str,
        ) -> Result<bool, DetectorError> {
            match *self {}
        }

        pub fn preprocess_uploaded(
            &mut self,
            _: usize,
            _: usize,
            _: &PreprocessSpec,
        ) -> Result<Transform, DetectorError> {
            match *self {}
        }

        pub fn infer(&mut self, _: usize) -> Result<(), BackendError> {
            match *self {}
        }

        pub fn max_images(&self) -> usize {
            match *self {}
        }

        pub fn wait(&self) -> Result<(), BackendError> {
            match *self {}
        }

        pub fn outputs(&self) -> &BatchOutputs {
            match *self {}
        }

        pub fn gather_rows(&mut self, _: Option<GatherPlan>) -> Result<bool, BackendError> {
            match *self {}
        }
    }
}
