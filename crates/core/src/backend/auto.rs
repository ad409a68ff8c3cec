//! `backend = "auto"`: the fastest backend that runs on this box.
//!
//! A GPU engine, where one opens, beats any CPU engine by a wide margin
//! on every box nanodetd targets, so the first GPU contender that opens
//! is taken without a race. Between CPU engines the margin depends on the
//! box (ONNX Runtime's kernels against tract's on this CPU, INT8 against
//! float), so they are timed on the model itself, and the faster wins.
//! Either way the choice and its reason become the engine's first note:
//! the log and the stats topic show them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BackendError, BackendKind, Engine, InputBatch, Skipped, with_notes};

/// What a model's `backend` setting asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The fastest that runs here.
    Auto,
    /// This one (falling back only where its own settings say).
    Only(BackendKind),
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendChoice::Auto => f.write_str("auto"),
            BackendChoice::Only(kind) => kind.fmt(f),
        }
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = super::UnknownBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(BackendChoice::Auto);
        }
        s.parse::<BackendKind>()
            .map(BackendChoice::Only)
            .map_err(|e| super::UnknownBackend { or_auto: true, ..e })
    }
}

impl<'de> serde::Deserialize<'de> for BackendChoice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// A backend `auto` may take, and how to open it.
pub struct Contender<'a> {
    /// The backend.
    pub kind: BackendKind,
    /// Opens the model on it.
    pub open: Box<dyn FnOnce() -> Result<Arc<dyn Engine>, BackendError> + 'a>,
}

/// Runs timed per CPU contender, after one untimed.
const TIMED_RUNS: usize = 5;

/// Opens `contenders` (best first) and keeps the fastest: the first that
/// runs on a GPU, else the CPU engine with the lowest median run time on
/// the model's own input size. Fails only when none opens.
pub fn choose_fastest(contenders: Vec<Contender<'_>>) -> Result<Arc<dyn Engine>, BackendError> {
    let mut skipped = Vec::new();
    let mut timed: Vec<(Arc<dyn Engine>, Duration)> = Vec::new();
    for contender in contenders {
        let engine = match (contender.open)() {
            Ok(engine) => engine,
            Err(e) => {
                skipped.push(Skipped {
                    kind: contender.kind,
                    at_timing: false,
                    error: e,
                });
                continue;
            }
        };
        if engine.on_gpu() {
            let mut notes = vec![format!(
                "auto: {} runs on the GPU, ahead of every CPU backend",
                contender.kind
            )];
            notes.extend(skipped.iter().map(|s| format!("auto: {s}")));
            return Ok(with_notes(engine, notes));
        }
        match median_run(engine.as_ref()) {
            Ok(time) => timed.push((engine, time)),
            Err(e) => skipped.push(Skipped {
                kind: contender.kind,
                at_timing: true,
                error: e,
            }),
        }
    }
    timed.sort_by_key(|(_, time)| *time);
    let mut ranked = timed.iter();
    let Some((fastest, time)) = ranked.next() else {
        return Err(BackendError::NoneRuns(skipped));
    };
    let beside: Vec<String> = ranked
        .map(|(engine, t)| format!("{} {:.1} ms", engine.backend(), ms(*t)))
        .collect();
    let mut notes = vec![format!(
        "auto: {} is the fastest here, {:.1} ms per run{} (median of {TIMED_RUNS} at start)",
        fastest.backend(),
        ms(*time),
        if beside.is_empty() {
            String::new()
        } else {
            format!(" beside {}", beside.join(", "))
        }
    )];
    notes.extend(skipped.iter().map(|s| format!("auto: {s}")));
    Ok(with_notes(fastest.clone(), notes))
}

fn ms(time: Duration) -> f64 {
    time.as_secs_f64() * 1e3
}

/// Median time of one inference on a grey image.
fn median_run(engine: &dyn Engine) -> Result<Duration, BackendError> {
    let mut session = engine.new_session()?;
    let input = vec![0.5f32; engine.info().input.shape.iter().product()];
    session.run(InputBatch::host(&input, 1))?;
    let mut times = Vec::with_capacity(TIMED_RUNS);
    for _ in 0..TIMED_RUNS {
        let start = Instant::now();
        session.run(InputBatch::host(&input, 1))?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[TIMED_RUNS / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        assert_eq!("auto".parse::<BackendChoice>(), Ok(BackendChoice::Auto));
        assert_eq!(
            "tract".parse::<BackendChoice>(),
            Ok(BackendChoice::Only(BackendKind::Tract))
        );
        let err = "openvino".parse::<BackendChoice>().unwrap_err().to_string();
        assert!(err.contains("tract") && err.ends_with("or auto"), "{err}");
        assert_eq!(BackendChoice::Auto.to_string(), "auto");
    }

    #[test]
    fn nothing_opens_is_an_error_naming_each_reason() {
        let fail = |kind, why: &'static str| Contender {
            kind,
            open: Box::new(move || Err(BackendError::unavailable(kind, why))),
        };
        let err = choose_fastest(vec![
            fail(BackendKind::OnnxRuntime, "no libonnxruntime"),
            fail(BackendKind::Tract, "model unreadable"),
        ])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("no libonnxruntime") && err.contains("model unreadable"),
            "{err}"
        );
    }
}
