//! H.264 video files as a camera: raw Annex B (`.h264`, `.264`) or MP4,
//! for replays and tests. Pacing is the camera task's (the config's `fps`,
//! or the rate [`VideoFile::frame_rate`] reads from the file), so this
//! stays free of clocks.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::h264::{AccessUnits, DecoderError, H264Decoder, MAX_ACCESS_UNIT, SplitError};
use super::{Captured, Miss};
use crate::contain::contain;
use crate::frame::FrameError;

/// The MP4 index (`moov`) a file may have: its sample tables grow with
/// the video's length (a few MB for hours), and the reader holds them.
pub const MAX_MP4_INDEX: u64 = 32 << 20;

/// The samples all tracks of an MP4 file may have together (55 hours at
/// 5 fps, 9 at 30): the reader keeps about 50 bytes per sample, and a
/// hostile `stsz` box can claim four billion in a few bytes.
pub const MAX_MP4_SAMPLES: u64 = 1_000_000;

/// Top-level boxes an MP4 file may have (a recording has a handful): each
/// costs a seek and a read while the file is checked.
const MAX_MP4_BOXES: usize = 10_000;

/// The rate a raw H.264 file plays at when the config sets none: the
/// stream carries no timing nanodetd reads.
pub const ANNEX_B_FPS: f64 = 25.0;

/// Why a video file cannot be played.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// The file cannot be opened or read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not an MP4 with an H.264 track, or a broken one.
    #[error("{}: {reason}", path.display())]
    Mp4 {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The decoder cannot start.
    #[error("{}: {source}", path.display())]
    Decoder {
        /// The file.
        path: PathBuf,
        /// Why.
        source: DecoderError,
    },
}

/// Where the access units come from.
enum Units {
    /// A raw stream, cut as it is read.
    AnnexB {
        file: File,
        split: AccessUnits,
        end: bool,
    },
    /// An MP4 track's samples, length-prefixed NAL units.
    Mp4 {
        file: File,
        /// SPS and PPS in Annex B, given before the first sample.
        parameter_sets: Vec<u8>,
        /// Each sample's offset and size, in decode order.
        samples: Vec<(u64, usize)>,
        length_size: usize,
        next: usize,
    },
}

/// An H.264 file, decoded frame by frame.
pub struct VideoFile {
    path: PathBuf,
    units: Units,
    decoder: H264Decoder,
    looping: bool,
    frame_rate: Option<f64>,
    sequence: u64,
    /// Pictures the decoder held back for reordering, handed out at the
    /// end of each pass.
    held: std::collections::VecDeque<Captured>,
    /// This pass's held pictures were taken.
    flushed: bool,
    /// This pass gave a picture or a broken frame: a looping file whose
    /// pass gives neither would otherwise spin for good.
    pass_gave_anything: bool,
}

/// True for a path nanodetd reads as MP4 (by its extension).
fn is_mp4(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["mp4", "m4v", "mov"].contains(&e.to_ascii_lowercase().as_str()))
}

impl VideoFile {
    /// Opens `path`: MP4 by its extension (`.mp4`, `.m4v`, `.mov`), raw
    /// Annex B otherwise. Pictures over `max_pixels` are broken frames.
    pub fn open(path: &Path, looping: bool, max_pixels: u64) -> Result<VideoFile, VideoError> {
        let read = |source| VideoError::Read {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(read)?;
        let (units, frame_rate) = if is_mp4(path) {
            mp4_units(path, file)?
        } else {
            (
                Units::AnnexB {
                    file,
                    split: AccessUnits::new(),
                    end: false,
                },
                None,
            )
        };
        Ok(VideoFile {
            path: path.to_owned(),
            units,
            decoder: H264Decoder::new(max_pixels).map_err(|source| VideoError::Decoder {
                path: path.to_owned(),
                source,
            })?,
            looping,
            frame_rate,
            sequence: 0,
            held: Default::default(),
            flushed: false,
            pass_gave_anything: false,
        })
    }

    /// Frames per second: an MP4's, from its samples' durations; a raw
    /// stream's default, [`ANNEX_B_FPS`].
    pub fn frame_rate(&self) -> f64 {
        self.frame_rate.unwrap_or(ANNEX_B_FPS)
    }

    /// The next picture. At the end a looping file starts over, otherwise
    /// [`Miss::Finished`].
    pub fn next_capture(&mut self) -> Result<Captured, Miss> {
        // A file of nothing but broken units must not spin here forever:
        // the caller counts each broken one and may give up.
        let next = self.next_picture();
        if matches!(next, Ok(_) | Err(Miss::Broken(_))) {
            self.pass_gave_anything = true;
        }
        next
    }

    fn next_picture(&mut self) -> Result<Captured, Miss> {
        loop {
            if let Some(picture) = self.held.pop_front() {
                return Ok(picture);
            }
            let unit = match self.next_unit() {
                Ok(Some(unit)) => unit,
                Ok(None) if !self.flushed => {
                    self.flushed = true;
                    let origin = format!("{} end", self.path.display());
                    match self.decoder.finish(&origin) {
                        Ok(held) => self.held.extend(held),
                        Err(e) => return Err(Miss::Broken(e)),
                    }
                    continue;
                }
                Ok(None) if self.looping && self.pass_gave_anything => {
                    self.rewind()?;
                    continue;
                }
                Ok(None) => return Err(Miss::Finished),
                Err(e) => return Err(e),
            };
            self.sequence += 1;
            let origin = format!("{} frame {}", self.path.display(), self.sequence);
            match self.decoder.decode(&unit, &origin) {
                Ok(Some(picture)) => return Ok(picture),
                Ok(None) => continue,
                Err(e) => return Err(Miss::Broken(e)),
            }
        }
    }

    fn read_error(&self, source: std::io::Error) -> Miss {
        Miss::Lost(
            VideoError::Read {
                path: self.path.clone(),
                source,
            }
            .into(),
        )
    }

    fn broken(&self, reason: String) -> Miss {
        Miss::Broken(FrameError::Decode {
            origin: format!("{} frame {}", self.path.display(), self.sequence + 1),
            reason,
        })
    }

    /// The next access unit in Annex B; `None` at the end.
    fn next_unit(&mut self) -> Result<Option<Vec<u8>>, Miss> {
        match &mut self.units {
            Units::AnnexB { file, split, end } => loop {
                match split.next_unit(*end) {
                    Some(Ok(unit)) => return Ok(Some(unit)),
                    Some(Err(SplitError::TooLarge)) => {
                        return Err(self.broken(SplitError::TooLarge.to_string()));
                    }
                    None if *end => return Ok(None),
                    None => {}
                }
                let mut piece = [0u8; 64 * 1024];
                match file.read(&mut piece) {
                    Ok(0) => *end = true,
                    Ok(n) => split.push(&piece[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.read_error(e)),
                }
            },
            Units::Mp4 {
                file,
                parameter_sets,
                samples,
                length_size,
                next,
            } => {
                let Some(&(offset, size)) = samples.get(*next) else {
                    return Ok(None);
                };
                *next += 1;
                let mut sample = vec![0u8; size];
                if let Err(e) = file
                    .seek(SeekFrom::Start(offset))
                    .and_then(|_| file.read_exact(&mut sample))
                {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        // A recording cut short: its end is here.
                        *next = samples.len();
                        return Err(self.broken(format!(
                            "the file ends inside this sample ({size} bytes at {offset})"
                        )));
                    }
                    return Err(self.read_error(e));
                }
                // The parameter sets go before every key frame, so a
                // decoder that lost its way (or a loop) can start there.
                let mut unit = Vec::with_capacity(size + parameter_sets.len() + 16);
                let key = *next == 1 || length_prefixed_has_idr(&sample, *length_size);
                if key {
                    unit.extend_from_slice(parameter_sets);
                }
                match annex_b(&sample, *length_size, &mut unit) {
                    Ok(()) => Ok(Some(unit)),
                    Err(reason) => Err(self.broken(reason)),
                }
            }
        }
    }

    /// Back to the first unit, for a looping file.
    fn rewind(&mut self) -> Result<(), Miss> {
        let result = match &mut self.units {
            Units::AnnexB { file, split, end } => {
                *split = AccessUnits::new();
                *end = false;
                file.seek(SeekFrom::Start(0)).map(|_| ())
            }
            Units::Mp4 { next, .. } => {
                *next = 0;
                Ok(())
            }
        };
        if let Err(e) = self.decoder.restart() {
            return Err(Miss::Lost(
                VideoError::Decoder {
                    path: self.path.clone(),
                    source: e,
                }
                .into(),
            ));
        }
        self.flushed = false;
        self.pass_gave_anything = false;
        result.map_err(|e| self.read_error(e))
    }
}

/// True when a sample of length-prefixed NAL units holds an IDR slice.
fn length_prefixed_has_idr(sample: &[u8], length_size: usize) -> bool {
    let mut at = 0;
    while let Some(len) = read_length(sample, at, length_size) {
        at += length_size;
        if sample.get(at).is_some_and(|h| h & 0x1f == 5) {
            return true;
        }
        at = at.saturating_add(len);
    }
    false
}

fn read_length(sample: &[u8], at: usize, length_size: usize) -> Option<usize> {
    let bytes = sample.get(at..at.checked_add(length_size)?)?;
    Some(bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b)))
}

/// Appends a sample of length-prefixed NAL units to `out` as Annex B.
fn annex_b(sample: &[u8], length_size: usize, out: &mut Vec<u8>) -> Result<(), String> {
    let mut at = 0;
    while at < sample.len() {
        let len = read_length(sample, at, length_size)
            .ok_or_else(|| format!("a NAL length cut short at byte {at}"))?;
        at += length_size;
        let nal = sample
            .get(at..at.saturating_add(len))
            .ok_or_else(|| format!("a NAL of {len} bytes at byte {at} runs past the sample"))?;
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
        at += len;
    }
    Ok(())
}

/// `file`'s top-level boxes, checked before the MP4 reader allocates its
/// tables: one `moov` of at most [`MAX_MP4_INDEX`] bytes whose tracks
/// claim at most [`MAX_MP4_SAMPLES`] in all, and no fragments (`moof`,
/// whose sample counts the reader trusts).
fn check_mp4_index(file: &mut File, len: u64) -> Result<(), String> {
    let mut at = 0u64;
    let mut moov = false;
    let mut boxes = 0;
    while at < len {
        boxes += 1;
        if boxes > MAX_MP4_BOXES {
            return Err(format!("more than {MAX_MP4_BOXES} top-level boxes"));
        }
        let mut header = Vec::with_capacity(16);
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.by_ref().take(16).read_to_end(&mut header))
            .map_err(|e| e.to_string())?;
        if header.len() < 8 {
            break;
        }
        let (size, kind, header_len) =
            box_header(&header).ok_or_else(|| format!("a broken box header at byte {at}"))?;
        let size = if size == 0 { len - at } else { size };
        if size < header_len || size > len - at {
            return Err(format!("a box at byte {at} claims {size} bytes"));
        }
        match &kind {
            b"moof" => return Err("a fragmented MP4 (moof): nanodetd reads plain MP4 only".into()),
            b"moov" if moov => return Err("two moov boxes".into()),
            b"moov" => {
                if size > MAX_MP4_INDEX {
                    return Err(format!(
                        "its index (moov) is {size} bytes, over the {MAX_MP4_INDEX} nanodetd reads"
                    ));
                }
                let mut index = vec![0u8; (size - header_len) as usize];
                file.seek(SeekFrom::Start(at + header_len))
                    .and_then(|_| file.read_exact(&mut index))
                    .map_err(|e| e.to_string())?;
                let mut samples = 0u64;
                count_samples(&index, 0, &mut samples)?;
                moov = true;
            }
            _ => {}
        }
        at += size;
    }
    if !moov {
        return Err("no moov box: not an MP4 file, or one cut short".into());
    }
    Ok(())
}

/// A box header: size (0: to the end), type, header length.
fn box_header(bytes: &[u8]) -> Option<(u64, [u8; 4], u64)> {
    let size = u32::from_be_bytes(bytes.get(0..4)?.try_into().ok()?);
    let kind: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
    if size == 1 {
        let large = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        return Some((large, kind, 16));
    }
    Some((u64::from(size), kind, 8))
}

/// Walks the boxes of `data` (the inside of a container box) down to each
/// `stsz`, adding its sample count to `samples`, and refuses a total over
/// [`MAX_MP4_SAMPLES`].
fn count_samples(data: &[u8], depth: usize, samples: &mut u64) -> Result<(), String> {
    const CONTAINERS: [&[u8; 4]; 5] = [b"trak", b"mdia", b"minf", b"stbl", b"edts"];
    let mut at = 0usize;
    while at + 8 <= data.len() {
        let (size, kind, header_len) =
            box_header(&data[at..]).ok_or_else(|| "a broken box header in moov".to_owned())?;
        let size = usize::try_from(size).map_err(|_| "a box too large".to_owned())?;
        let end = if size == 0 {
            data.len()
        } else {
            at.saturating_add(size)
        };
        let header_len = header_len as usize;
        if size != 0 && size < header_len || end > data.len() {
            return Err(format!(
                "a {} box runs past its parent",
                String::from_utf8_lossy(&kind)
            ));
        }
        let inside = &data[at + header_len..end];
        if &kind == b"stsz" {
            let count = inside
                .get(8..12)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| "a stsz box cut short".to_owned())?;
            *samples += u64::from(count);
            if *samples > MAX_MP4_SAMPLES {
                return Err(format!(
                    "tracks of {samples} samples, over the {MAX_MP4_SAMPLES} nanodetd reads"
                ));
            }
        } else if depth < 8 && CONTAINERS.contains(&&kind) {
            count_samples(inside, depth + 1, samples)?;
        }
        at = end;
    }
    Ok(())
}

/// The first H.264 video track of an MP4 file: its units and frame rate.
fn mp4_units(path: &Path, mut file: File) -> Result<(Units, Option<f64>), VideoError> {
    let bad = |reason: String| VideoError::Mp4 {
        path: path.to_owned(),
        reason,
    };
    let len = file
        .metadata()
        .map_err(|source| VideoError::Read {
            path: path.to_owned(),
            source,
        })?
        .len();
    check_mp4_index(&mut file, len).map_err(bad)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| bad(e.to_string()))?;
    // re_mp4 indexes and panics on some malformed tables: contained.
    let parsed = contain(|| {
        let mp4 = re_mp4::Mp4::read(std::io::BufReader::new(&mut file), len)
            .map_err(|e| format!("not a readable MP4: {e}"))?;
        let mut tracks = mp4.tracks().values();
        let (track, avc) = tracks
            .find_map(|t| match &t.trak(&mp4).mdia.minf.stbl.stsd.contents {
                re_mp4::StsdBoxContent::Avc1(avc) => Some((t, avc)),
                _ => None,
            })
            .ok_or_else(|| {
                let codecs: Vec<String> = mp4
                    .tracks()
                    .values()
                    .filter_map(|t| t.codec_string(&mp4))
                    .collect();
                format!(
                    "no H.264 (avc1) video track (tracks: {}); nanodetd decodes H.264 only",
                    if codecs.is_empty() {
                        "none".into()
                    } else {
                        codecs.join(", ")
                    }
                )
            })?;
        let mut parameter_sets = Vec::new();
        for nal in avc
            .avcc
            .sequence_parameter_sets
            .iter()
            .chain(&avc.avcc.picture_parameter_sets)
        {
            parameter_sets.extend_from_slice(&[0, 0, 0, 1]);
            parameter_sets.extend_from_slice(&nal.bytes);
        }
        let mut samples = Vec::with_capacity(track.samples.len());
        for s in &track.samples {
            let size = usize::try_from(s.size)
                .ok()
                .filter(|&n| n <= MAX_ACCESS_UNIT)
                .ok_or_else(|| format!("sample {} of {} bytes is over the limit", s.id, s.size))?;
            samples.push((s.offset, size));
        }
        let seconds = track.duration as f64 / track.timescale.max(1) as f64;
        let rate = (seconds > 0.0 && !samples.is_empty())
            .then(|| samples.len() as f64 / seconds)
            .filter(|r| r.is_finite() && (0.01..=1000.0).contains(r));
        let length_size = usize::from(avc.avcc.length_size_minus_one & 3) + 1;
        Ok::<_, String>((parameter_sets, samples, length_size, rate))
    })
    .map_err(|panic| bad(format!("the MP4 reader failed on it ({panic})")))?;
    let (parameter_sets, samples, length_size, rate) = parsed.map_err(bad)?;
    if samples.is_empty() {
        return Err(bad("its H.264 track has no samples".into()));
    }
    Ok((
        Units::Mp4 {
            file,
            parameter_sets,
            samples,
            length_size,
            next: 0,
        },
        rate,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefixed_samples_become_annex_b_and_a_cut_one_is_an_error() {
        let sample = [0, 0, 0, 2, 0x65, 0x88, 0, 0, 0, 1, 0x41];
        let mut out = Vec::new();
        annex_b(&sample, 4, &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 1, 0x65, 0x88, 0, 0, 0, 1, 0x41]);
        assert!(length_prefixed_has_idr(&sample, 4));
        assert!(!length_prefixed_has_idr(&sample[6..], 4));
        let e = annex_b(&sample[..9], 4, &mut Vec::new()).unwrap_err();
        assert!(e.contains("cut short"), "{e}");
        let e = annex_b(&[0, 0, 0, 9, 1], 4, &mut Vec::new()).unwrap_err();
        assert!(e.contains("runs past the sample"), "{e}");
    }

    /// A box: size, type, body.
    fn mp4_box(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut b = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        b.extend_from_slice(kind);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn an_mp4_whose_index_claims_billions_of_samples_is_refused_before_it_is_read() {
        let stsz = |count: u32| {
            let mut body = vec![0u8; 4];
            body.extend_from_slice(&1u32.to_be_bytes()); // one size for all
            body.extend_from_slice(&count.to_be_bytes());
            mp4_box(b"stsz", &body)
        };
        let nest = |stsz: Vec<u8>| {
            let stbl = mp4_box(b"stbl", &stsz);
            let minf = mp4_box(b"minf", &stbl);
            let mdia = mp4_box(b"mdia", &minf);
            mp4_box(b"trak", &mdia)
        };
        let count = |data: &[u8]| {
            let mut samples = 0;
            count_samples(data, 0, &mut samples).map(|()| samples)
        };
        assert_eq!(count(&nest(stsz(1000))), Ok(1000));
        let e = count(&nest(stsz(u32::MAX))).unwrap_err();
        assert!(e.contains("4294967295 samples"), "{e}");
        // Many tracks of a million each: the total counts.
        let e = count(&[nest(stsz(600_000)), nest(stsz(600_000))].concat()).unwrap_err();
        assert!(e.contains("1200000 samples"), "{e}");
        let mut cut = nest(stsz(10));
        cut.truncate(cut.len() - 3);
        assert!(count(&cut).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.mp4");
        let file = [
            mp4_box(b"ftyp", b"isom\0\0\0\0"),
            mp4_box(b"moov", &nest(stsz(u32::MAX))),
        ]
        .concat();
        std::fs::write(&path, file).unwrap();
        let e = VideoFile::open(&path, false, 1 << 20)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("huge.mp4") && e.contains("4294967295 samples"),
            "{e}"
        );
        std::fs::write(&path, b"\0\0\0\x10ftypisom\0\0\0\0").unwrap();
        let e = VideoFile::open(&path, false, 1 << 20)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no moov box"), "{e}");
        let refused = |file: Vec<u8>| {
            std::fs::write(&path, file).unwrap();
            VideoFile::open(&path, false, 1 << 20)
                .err()
                .unwrap()
                .to_string()
        };
        // Fragments: re_mp4 trusts a trun's count when its samples have no
        // sizes of their own.
        let e = refused(
            [
                mp4_box(b"ftyp", b"isom\0\0\0\0"),
                mp4_box(b"moov", &nest(stsz(1))),
                mp4_box(b"moof", &[0; 8]),
            ]
            .concat(),
        );
        assert!(e.contains("fragmented MP4"), "{e}");
        let e = refused(
            [
                mp4_box(b"moov", &nest(stsz(1))),
                mp4_box(b"moov", &nest(stsz(1))),
            ]
            .concat(),
        );
        assert!(e.contains("two moov boxes"), "{e}");
        let e = refused(
            (0..=MAX_MP4_BOXES)
                .flat_map(|_| mp4_box(b"free", &[]))
                .collect(),
        );
        assert!(e.contains("more than 10000 top-level boxes"), "{e}");
    }

    #[test]
    fn a_raw_file_of_garbage_gives_broken_frames_or_the_end_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.h264");
        let mut junk = Vec::new();
        for i in 0..200u32 {
            junk.extend_from_slice(&[0, 0, 1, if i % 3 == 0 { 0x65 } else { 0x41 }, 0x80]);
            junk.extend((0..300u32).map(|k| ((k ^ i).wrapping_mul(2_654_435_761) >> 11) as u8 | 1));
        }
        std::fs::write(&path, junk).unwrap();
        let mut video = VideoFile::open(&path, false, 1 << 20).unwrap();
        let mut broken = 0;
        loop {
            match video.next_capture() {
                Err(Miss::Broken(_)) => broken += 1,
                Err(Miss::Finished) => break,
                Ok(_) => {}
                Err(Miss::Lost(e)) => panic!("{e}"),
                Err(Miss::Idle) => unreachable!(),
            }
        }
        assert!(broken > 0);
    }
}
