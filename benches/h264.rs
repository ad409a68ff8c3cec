//! Criterion benches for IP cameras (issue 23): decoding a 1080p H.264
//! stream with OpenH264, every access unit as the camera task does it
//! (the NV12 copy-out included), and converting one decoded NV12 picture
//! for the detector, which only the frames it takes pay for.
//!
//! The clips are made by ffmpeg (libx264, 4 Mbit/s, a key frame a second
//! at 10 fps) from the sample photos, in target/bench-h264; benches/h264.sh
//! runs this beside ffmpeg's own decoder on the same clips.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use nanodetd::capture::Captured;
use nanodetd::capture::h264::{AccessUnits, H264Decoder};

fn assets() -> PathBuf {
    std::env::var_os("NANODETD_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// The 1080p clip of `profile` (`baseline`, or `high` with B-frames),
/// made once.
fn clip(profile: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-h264");
    let out = dir.join(format!("1080p-{profile}.h264"));
    if out.exists() {
        return out;
    }
    std::fs::create_dir_all(&dir).expect("target/bench-h264");
    let mut args: Vec<String> = vec!["-loglevel".into(), "error".into(), "-y".into()];
    for name in ["hpc203_bus.jpg", "hpc203_dog.jpg", "hpc203_zidane.jpg"] {
        let photo = assets().join("samples").join(name);
        args.extend(
            ["-loop", "1", "-framerate", "10", "-t", "1", "-i"]
                .map(String::from)
                .into_iter()
                .chain([photo.to_string_lossy().into_owned()]),
        );
    }
    args.extend(
        [
            "-filter_complex",
            "[0]scale=1920:1080,setsar=1[a];[1]scale=1920:1080,setsar=1[b];[2]scale=1920:1080,setsar=1[c];[a][b][c]concat=n=3,format=yuv420p",
            "-c:v",
            "libx264",
            "-b:v",
            "4M",
            "-g",
            "10",
            "-profile:v",
            profile,
        ]
        .map(String::from),
    );
    args.push(out.to_string_lossy().into_owned());
    let made = Command::new("ffmpeg")
        .args(&args)
        .status()
        .expect("ffmpeg makes the clips (apt-get install ffmpeg)");
    assert!(made.success(), "ffmpeg failed");
    out
}

fn units(path: &Path) -> Vec<Vec<u8>> {
    let mut split = AccessUnits::new();
    split.push(&std::fs::read(path).expect("the clip"));
    std::iter::from_fn(|| split.next_unit(true))
        .map(|u| u.expect("a unit within the limit"))
        .collect()
}

/// Every unit through a fresh decoder, the held pictures too: the
/// pictures out.
fn decode_all(units: &[Vec<u8>]) -> usize {
    let mut decoder = H264Decoder::new(1920 * 1080).expect("decoder");
    let mut pictures = 0;
    for unit in units {
        if decoder.decode(unit, "bench").expect("decodes").is_some() {
            pictures += 1;
        }
    }
    pictures + decoder.finish("bench").expect("flushes").len()
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("h264 decode 1920x1080");
    for profile in ["baseline", "high"] {
        let units = units(&clip(profile));
        assert_eq!(decode_all(&units), units.len(), "every unit a picture");
        group.throughput(Throughput::Elements(units.len() as u64));
        group.bench_function(format!("{profile}, {} frames", units.len()), |b| {
            b.iter(|| black_box(decode_all(black_box(&units))));
        });
    }
    group.finish();
}

fn convert(c: &mut Criterion) {
    let units = units(&clip("baseline"));
    let mut decoder = H264Decoder::new(1920 * 1080).expect("decoder");
    let picture = units
        .iter()
        .find_map(|u| decoder.decode(u, "bench").expect("decodes"))
        .expect("a picture");
    let Captured::Raw { layout, bytes, .. } = picture else {
        panic!("decoded pictures are NV12 buffers");
    };
    c.bench_function("nv12 1920x1080 -> bgr frame (taken frames only)", |b| {
        b.iter(|| black_box(nanodetd::capture::to_frame(&layout, &bytes, "bench")))
    });
}

criterion_group!(benches, decode, convert);
criterion_main!(benches);
