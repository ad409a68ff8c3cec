//! H.264: cutting an Annex B byte stream into access units, and decoding
//! them with OpenH264 into NV12 camera buffers. Every access unit goes
//! through the decoder (each picture is the reference of the next); the
//! colour conversion is left to whoever takes the frame
//! ([`Captured::Raw`]), so frames the detector never takes cost no
//! conversion.

use openh264::OpenH264API;
use openh264::decoder::{Decoder, DecoderConfig, Flush};
use openh264::formats::YUVSource;

use super::{BufferLayout, CameraFormat, Captured, RawBytes};
use crate::contain::contain;
use crate::frame::FrameError;

/// An access unit larger than this is refused (a 4K I-frame at a high
/// bit rate is about 1 MB): it bounds what a file or a camera can make
/// the daemon buffer.
pub const MAX_ACCESS_UNIT: usize = 8 << 20;

/// NAL unit types (H.264 table 7-1) that matter here.
const NAL_SLICE: u8 = 1;
const NAL_IDR: u8 = 5;

/// The type of the NAL unit whose header byte is `header`.
fn nal_type(header: u8) -> u8 {
    header & 0x1f
}

/// Where each NAL unit of `data` starts (the byte after its `00 00 01`
/// start code), in order.
fn nal_starts(data: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        while at + 3 <= data.len() {
            if data[at] == 0 && data[at + 1] == 0 && data[at + 2] == 1 {
                at += 3;
                return Some(at);
            }
            // Skip ahead past bytes that cannot begin a start code.
            at += if data[at + 2] > 1 {
                3
            } else if data[at + 1] > 1 {
                2
            } else {
                1
            };
        }
        None
    })
}

/// True when the Annex B access unit holds an IDR slice: decoding can
/// start there.
pub fn is_key_unit(unit: &[u8]) -> bool {
    nal_starts(unit).any(|at| unit.get(at).is_some_and(|&h| nal_type(h) == NAL_IDR))
}

/// Whether the NAL unit at `at` (its header byte) opens a new access unit
/// once the unit being gathered holds a slice: `None` where more bytes are
/// needed to tell. H.264 7.4.1.2.3, without the rare cases (redundant
/// pictures, slices of one picture with different `frame_num`) that
/// cameras and encoders do not send: an access unit delimiter, SEI or
/// parameter set, or the first slice of a picture (`first_mb_in_slice`
/// = 0, whose exp-Golomb code is a single 1 bit).
fn opens_unit(data: &[u8], at: usize) -> Option<bool> {
    let kind = nal_type(*data.get(at)?);
    match kind {
        NAL_SLICE | NAL_IDR => Some(data.get(at + 1)? & 0x80 != 0),
        6..=9 | 14..=18 => Some(true),
        _ => Some(false),
    }
}

/// Why an Annex B stream cannot be cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// More than [`MAX_ACCESS_UNIT`] bytes without the end of a unit.
    #[error("an access unit over {MAX_ACCESS_UNIT} bytes")]
    TooLarge,
}

/// Cuts an Annex B byte stream, fed in pieces of any size, into access
/// units: what the decoder takes as one picture. Holds at most one unit
/// and the piece fed after it.
#[derive(Debug, Default)]
pub struct AccessUnits {
    buffer: Vec<u8>,
    /// Where the search for the next start code goes on: every NAL unit
    /// that starts before it has been looked at.
    search_from: usize,
    /// The unit being gathered (from the buffer's start) holds a slice.
    has_slice: bool,
    /// After a unit over the limit: bytes are dropped up to the next unit.
    skipping: bool,
}

impl AccessUnits {
    /// An empty splitter.
    pub fn new() -> AccessUnits {
        AccessUnits::default()
    }

    /// Adds the next bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole access unit, if the bytes so far hold one; at the
    /// stream's `end`, what is left. An error for a unit over
    /// [`MAX_ACCESS_UNIT`], whose bytes are dropped.
    pub fn next_unit(&mut self, end: bool) -> Option<Result<Vec<u8>, SplitError>> {
        let mut from = self.search_from;
        loop {
            let Some(start) = nal_starts(&self.buffer[from..]).next().map(|s| s + from) else {
                break;
            };
            match opens_unit(&self.buffer, start) {
                // The NAL's first bytes are still to come.
                None => {
                    self.search_from = start - 3;
                    return self.at_end(end);
                }
                // While skipping an oversized unit, any opener ends it, so
                // the parameter sets of the next key frame are kept.
                Some(true) if self.has_slice || self.skipping => {
                    // The unit ends before this NAL's start code (and any
                    // zero byte of a 4-byte code: it belongs to the next).
                    let mut cut = start - 3;
                    if cut > 0 && self.buffer[cut - 1] == 0 {
                        cut -= 1;
                    }
                    let rest = self.buffer.split_off(cut);
                    let unit = std::mem::replace(&mut self.buffer, rest);
                    self.search_from = 0;
                    self.has_slice = false;
                    if std::mem::take(&mut self.skipping) || unit.len() > MAX_ACCESS_UNIT {
                        return Some(Err(SplitError::TooLarge));
                    }
                    return Some(Ok(unit));
                }
                Some(_) => {
                    let kind = nal_type(self.buffer[start]);
                    self.has_slice |= kind == NAL_SLICE || kind == NAL_IDR;
                    from = start;
                }
            }
        }
        // A start code may begin in the last two bytes, not before.
        self.search_from = from.max(self.buffer.len().saturating_sub(2));
        if self.buffer.len() > MAX_ACCESS_UNIT {
            // Keep the last bytes, which may hold the start of a code.
            let keep = self.buffer.split_off(self.buffer.len() - 3);
            self.buffer = keep;
            self.search_from = 0;
            self.skipping = true;
        }
        self.at_end(end)
    }

    fn at_end(&mut self, end: bool) -> Option<Result<Vec<u8>, SplitError>> {
        if !end || self.buffer.is_empty() {
            return None;
        }
        self.search_from = 0;
        let had_slice = std::mem::take(&mut self.has_slice);
        let unit = std::mem::take(&mut self.buffer);
        if std::mem::take(&mut self.skipping) {
            return Some(Err(SplitError::TooLarge));
        }
        had_slice.then_some(Ok(unit))
    }
}

/// Why a decoder cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the H.264 decoder: {reason}")]
pub struct DecoderError {
    reason: String,
}

/// OpenH264, handing out each picture as an NV12 buffer.
pub struct H264Decoder {
    decoder: Decoder,
    /// After a broken unit or lost packets, units are skipped until a key
    /// frame, rather than decoded against a broken reference.
    waiting_for_key: bool,
    max_pixels: u64,
}

impl H264Decoder {
    /// A decoder whose pictures may have at most `max_pixels`; it waits
    /// for a key frame before the first.
    pub fn new(max_pixels: u64) -> Result<H264Decoder, DecoderError> {
        Ok(H264Decoder {
            // No flush after each unit: with B-frames (Main and High
            // profile cameras) a flush hands out a picture before its
            // references are in, and the decoder fails once per GOP.
            // Pictures come out in display order, as many units late as
            // the stream reorders (none for Baseline).
            decoder: Decoder::with_api_config(
                OpenH264API::from_source(),
                DecoderConfig::new().flush_after_decode(Flush::NoFlush),
            )
            .map_err(|e| DecoderError {
                reason: e.to_string(),
            })?,
            waiting_for_key: true,
            max_pixels,
        })
    }

    /// Units were lost before the next one: wait for a key frame.
    pub fn lost(&mut self) {
        self.waiting_for_key = true;
    }

    /// A fresh decoder for a new stream (a file starting over): after
    /// [`finish`](Self::finish), OpenH264's reordering state fails on
    /// the next pass's B-frames.
    pub fn restart(&mut self) -> Result<(), DecoderError> {
        *self = H264Decoder::new(self.max_pixels)?;
        Ok(())
    }

    /// True while units are skipped up to the next key frame.
    pub fn waiting_for_key(&self) -> bool {
        self.waiting_for_key
    }

    /// Decodes one Annex B access unit: its picture, `None` where it
    /// gives none (parameter sets only), or a broken frame (a unit the
    /// decoder refuses, one skipped while waiting for a key frame, or a
    /// picture over the budget). `origin` names it in errors.
    pub fn decode(&mut self, unit: &[u8], origin: &str) -> Result<Option<Captured>, FrameError> {
        let broken = |reason: String| FrameError::Decode {
            origin: origin.to_owned(),
            reason,
        };
        if self.waiting_for_key {
            if !is_key_unit(unit) {
                return Err(broken("skipped: waiting for a key frame".into()));
            }
            self.waiting_for_key = false;
        }
        let max_pixels = self.max_pixels;
        let decoded = contain(|| match self.decoder.decode(unit) {
            Err(e) => Err(broken(format!("H.264: {e}"))),
            Ok(None) => Ok(None),
            Ok(Some(picture)) => nv12(&picture, max_pixels, origin).map(Some),
        })
        .map_err(|panic| broken(format!("the H.264 decoder failed on it ({panic})")))
        .flatten();
        if decoded.is_err() {
            self.waiting_for_key = true;
        }
        decoded
    }
}

impl H264Decoder {
    /// The pictures still held for reordering, at the end of a stream.
    pub fn finish(&mut self, origin: &str) -> Result<Vec<Captured>, FrameError> {
        let max_pixels = self.max_pixels;
        let broken = |reason: String| FrameError::Decode {
            origin: origin.to_owned(),
            reason,
        };
        contain(|| match self.decoder.flush_remaining() {
            Err(e) => Err(broken(format!("H.264: {e}"))),
            Ok(pictures) => pictures
                .iter()
                .map(|p| nv12(p, max_pixels, origin))
                .collect(),
        })
        .map_err(|panic| broken(format!("the H.264 decoder failed on it ({panic})")))
        .flatten()
    }
}

/// A decoded I420 picture copied out as an NV12 buffer (the decoder reuses
/// its planes), which the CPU and GPU paths both convert.
fn nv12(picture: &impl YUVSource, max_pixels: u64, origin: &str) -> Result<Captured, FrameError> {
    let (width, height) = picture.dimensions();
    let too_large = || FrameError::TooLarge {
        origin: origin.to_owned(),
        width: u32::try_from(width).unwrap_or(u32::MAX),
        height: u32::try_from(height).unwrap_or(u32::MAX),
        max_pixels,
    };
    if (width as u64).saturating_mul(height as u64) > max_pixels {
        return Err(too_large());
    }
    let layout = BufferLayout {
        format: CameraFormat::Nv12,
        width,
        height,
        bytes_per_line: width.div_ceil(2) * 2,
    };
    let (y_stride, u_stride, v_stride) = picture.strides();
    let (y, u, v) = (picture.y(), picture.u(), picture.v());
    let (chroma_width, chroma_height) = (width.div_ceil(2), height.div_ceil(2));
    let short = |plane: &[u8], stride: usize, rows: usize, row_len: usize| {
        rows > 0 && plane.len() < (rows - 1) * stride + row_len
    };
    if short(y, y_stride, height, width)
        || short(u, u_stride, chroma_height, chroma_width)
        || short(v, v_stride, chroma_height, chroma_width)
    {
        return Err(FrameError::Decode {
            origin: origin.to_owned(),
            reason: "the decoder's planes are shorter than its picture".into(),
        });
    }
    let mut bytes = vec![0u8; layout.needed()];
    let (luma, chroma) = bytes.split_at_mut(layout.bytes_per_line * height);
    for (row, out) in luma.chunks_exact_mut(layout.bytes_per_line).enumerate() {
        out[..width].copy_from_slice(&y[row * y_stride..][..width]);
    }
    for (row, out) in chroma.chunks_exact_mut(layout.bytes_per_line).enumerate() {
        let u = &u[row * u_stride..][..chroma_width];
        let v = &v[row * v_stride..][..chroma_width];
        for ((pair, &u), &v) in out.chunks_exact_mut(2).zip(u).zip(v) {
            pair[0] = u;
            pair[1] = v;
        }
    }
    Ok(Captured::Raw {
        layout,
        bytes: RawBytes::Copied(bytes),
        origin: origin.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Annex B NAL unit: start code, header, payload.
    fn nal(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut n = vec![0, 0, 0, 1, 0x60 | kind];
        n.extend_from_slice(payload);
        n
    }

    fn units_of(stream: &[u8], piece: usize) -> Vec<Result<Vec<u8>, SplitError>> {
        let mut split = AccessUnits::new();
        let mut units = Vec::new();
        for chunk in stream.chunks(piece.max(1)) {
            split.push(chunk);
            while let Some(u) = split.next_unit(false) {
                units.push(u);
            }
        }
        while let Some(u) = split.next_unit(true) {
            units.push(u);
        }
        units
    }

    #[test]
    fn a_stream_is_cut_before_each_pictures_first_slice_or_its_parameter_sets() {
        // SPS PPS IDR(first) IDR(second slice) | P | AUD P P(second slice).
        let first = [
            nal(7, &[1, 2]),
            nal(8, &[3]),
            nal(5, &[0x88, 9]),
            nal(5, &[0x40, 9]),
        ]
        .concat();
        let second = nal(1, &[0x9a, 0, 0, 3, 1]);
        let third = [nal(9, &[0x10]), nal(1, &[0x80]), nal(1, &[0x20, 0])].concat();
        let stream = [first.clone(), second.clone(), third.clone()].concat();
        for piece in [1, 2, 3, 5, 7, 1000] {
            let units: Vec<Vec<u8>> = units_of(&stream, piece)
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(
                units,
                [first.clone(), second.clone(), third.clone()],
                "fed {piece} bytes at a time"
            );
        }
        assert!(is_key_unit(&first));
        assert!(!is_key_unit(&second) && !is_key_unit(&third));
    }

    #[test]
    fn an_oversized_unit_is_an_error_and_the_stream_goes_on_after_it() {
        let huge = nal(5, &vec![0x80; MAX_ACCESS_UNIT + 10]);
        let next = nal(1, &[0x80, 1]);
        let units = units_of(&[huge, next.clone()].concat(), 1 << 16);
        assert_eq!(units, [Err(SplitError::TooLarge), Ok(next)]);
    }

    #[test]
    fn oversized_garbage_without_a_slice_does_not_swallow_the_next_key_frame() {
        // Past the limit well before the key frame's parameter sets come:
        // they would be one unit with it otherwise (an SEI opens the unit
        // that the next picture ends).
        let garbage = nal(6, &vec![0x80; MAX_ACCESS_UNIT + 70_000]);
        let key = [nal(7, &[1]), nal(8, &[2]), nal(5, &[0x80, 3])].concat();
        let units = units_of(&[garbage, key.clone()].concat(), 1 << 16);
        assert_eq!(units, [Err(SplitError::TooLarge), Ok(key)]);
    }

    #[test]
    fn bytes_without_a_slice_are_no_unit() {
        assert!(units_of(&[0, 0, 0, 1, 0x67, 1, 2], 3).is_empty());
        assert!(units_of(b"not h264 at all", 4).is_empty());
    }

    #[test]
    fn garbage_and_units_before_a_key_frame_are_broken_frames_not_panics() {
        let mut decoder = H264Decoder::new(1 << 20).unwrap();
        let slice = nal(1, &[0x80; 64]);
        let e = decoder
            .decode(&slice, "cam frame 1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cam frame 1") && e.contains("waiting for a key frame"),
            "{e}"
        );
        for seed in 0..50u32 {
            let mut junk = nal(5, &[]);
            junk.extend((0..2000u32).map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 13) as u8));
            if let Err(e) = decoder.decode(&junk, "cam frame 2") {
                assert!(e.to_string().contains("cam frame 2"), "{e}");
            }
        }
    }
}
