//! `nanodetd calibrate`: captures representative frames from a configured
//! camera into the INT8 calibration directory.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use clap::Args;

use nanodetd::capture::{Miss, Source};
use nanodetd::config::Config;
use nanodetd::engine_cache::write_atomically;
use nanodetd::quantize::calibration::Thumbnail;

use super::Failure;

/// Arguments of `calibrate`.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// The daemon's configuration (cameras and [model.int8]).
    #[arg(long, short = 'c', default_value = "/etc/nanodetd/nanodetd.toml")]
    config: PathBuf,
    /// The `[[camera]]` to capture from, by name.
    #[arg(long)]
    camera: String,
    /// Frames to keep.
    #[arg(long, default_value_t = 300)]
    frames: usize,
    /// Least time between kept frames on a live camera, e.g. 2s, 500ms,
    /// 1m (replays take every frame).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    every: Duration,
    /// Frames whose 32×32 grey thumbnail differs from the last kept one by
    /// less than this fraction of full scale are near-duplicates, skipped.
    #[arg(long, default_value_t = 0.02)]
    min_change: f32,
    /// Where to write (default: [model.int8] calibration from the config).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 2s, 500ms or 1m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is not a usable duration"))
}

pub fn run(args: &CalibrateArgs) -> Result<(), Failure> {
    nanodetd::logging::start(log::LevelFilter::Info);
    let config = Config::load(&args.config).map_err(|e| Failure::Config(e.into()))?;
    let camera = config
        .cameras
        .iter()
        .find(|c| c.name.as_str() == args.camera)
        .ok_or_else(|| {
            let known: Vec<&str> = config.cameras.iter().map(|c| c.name.as_str()).collect();
            Failure::BadInput(anyhow!(
                "{}: no camera named {:?}; it has: {}",
                args.config.display(),
                args.camera,
                known.join(", ")
            ))
        })?;
    if args.frames == 0 {
        return Err(Failure::BadInput(anyhow!("--frames must be at least 1")));
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| config.model.int8.calibration.clone());
    std::fs::create_dir_all(&out)
        .map_err(|e| Failure::Runtime(anyhow!("{}: cannot create: {e}", out.display())))?;
    let mut source = Source::open(&camera.source_spec()).map_err(|e| {
        Failure::Runtime(anyhow::Error::new(e).context(format!("camera {}", args.camera)))
    })?;
    let replay = source.is_replay();

    let mut last: Option<Thumbnail> = None;
    let mut last_kept = None::<Instant>;
    let (mut kept, mut similar, mut broken) = (0usize, 0usize, 0usize);
    while kept < args.frames {
        let frame = match source.next_frame() {
            Ok(frame) => frame,
            Err(Miss::Idle) => continue,
            Err(Miss::Broken(e)) => {
                broken += 1;
                log::warn!("camera {}: {e} (skipped)", args.camera);
                continue;
            }
            Err(Miss::Finished) => {
                log::warn!(
                    "camera {}: the replay ended after {kept} of {} frames",
                    args.camera,
                    args.frames
                );
                break;
            }
            Err(Miss::Lost(e)) => {
                return Err(Failure::Runtime(anyhow!(
                    "camera {}: {e} (kept {kept} frames in {})",
                    args.camera,
                    out.display()
                )));
            }
        };
        if !replay && last_kept.is_some_and(|t| t.elapsed() < args.every) {
            continue;
        }
        let thumb = Thumbnail::of(&frame);
        if last
            .as_ref()
            .is_some_and(|l| l.difference(&thumb) < args.min_change)
        {
            similar += 1;
            continue;
        }
        let jpeg = frame.to_jpeg(95).map_err(|e| Failure::Runtime(e.into()))?;
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let path = out.join(format!("{}-{stamp}-{kept:05}.jpg", args.camera));
        write_atomically(&path, &jpeg)
            .map_err(|e| Failure::Runtime(anyhow!("{}: cannot write: {e}", path.display())))?;
        kept += 1;
        last = Some(thumb);
        last_kept = Some(Instant::now());
        if kept % 10 == 0 || kept == args.frames {
            log::info!("kept {kept}/{} frames", args.frames);
        }
    }
    println!(
        "{}: kept {kept} frames from camera {}; {similar} near-duplicates and {broken} broken frames skipped",
        out.display(),
        args.camera
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_units_operators_write() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
