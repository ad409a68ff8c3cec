//! A model's trial load, in a child process, before the daemon loads it.
//!
//! tract-onnx's loader panics on some malformed models (fuzzing found one,
//! which `model::limits` now refuses by name), and a graph whose declared
//! shapes are small can still compute intermediates of many gigabytes. In
//! a release build a panic is an abort, and so is a failed allocation: the
//! model would take the whole daemon down, on a hot swap the running model
//! with it, and systemd would restart it into the same config. So before a
//! model is loaded, `nanodetd probe-model` loads it and runs it once on a
//! blank frame, under an address-space limit, with each engine the daemon
//! may run it on ([`engines_to_probe`]): tract, and ONNX Runtime on the
//! CPU, whose C++ loader a hostile model may crash too, then on its CUDA
//! provider where the daemon would use it. TensorRT's builder, and ONNX
//! Runtime's TensorRT provider, are not probed: a build takes minutes, more
//! on a Jetson than a probe may take. Only a child that crashed (a
//! signal, or out of time) refuses the model; one that refused it cleanly
//! leaves the verdict to the backend, which says why in its own words when
//! the daemon loads it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::backend::onnxruntime::Provider;
use crate::backend::{BackendChoice, BackendKind};

/// The engine a probe loads the model with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEngine {
    /// tract, as the daemon runs it.
    Tract,
    /// ONNX Runtime with this provider, from this library (else the
    /// default search).
    OnnxRuntime {
        /// `[model.onnxruntime] library`.
        library: Option<PathBuf>,
        /// The CPU's, or CUDA's.
        provider: Provider,
    },
}

impl ProbeEngine {
    /// The backend this engine is.
    pub fn backend(&self) -> BackendKind {
        match self {
            ProbeEngine::Tract => BackendKind::Tract,
            ProbeEngine::OnnxRuntime { .. } => BackendKind::OnnxRuntime,
        }
    }

    /// Whether the child runs under [`PROBE_ADDRESS_SPACE`]. A CUDA context
    /// reserves more address space than any such limit, so a GPU probe
    /// runs without one; [`engines_to_probe`] puts the CPU probe of the
    /// same model, which bounds its memory, first.
    pub fn bounded(&self) -> bool {
        !matches!(
            self,
            ProbeEngine::OnnxRuntime {
                provider: Provider::Cuda | Provider::TensorRt,
                ..
            }
        )
    }

    /// The `probe-model` arguments that select this engine.
    pub fn args(&self) -> Vec<OsString> {
        let ProbeEngine::OnnxRuntime { library, provider } = self else {
            return Vec::new();
        };
        let mut args: Vec<OsString> = vec!["--onnxruntime".into()];
        if let Some(library) = library {
            args.extend(["--onnxruntime-library".into(), library.into()]);
        }
        if *provider != Provider::Cpu {
            args.extend(["--provider".into(), provider.name().into()]);
        }
        args
    }

    /// How the refusal names it: `tract`, `onnxruntime`, `onnxruntime
    /// (CUDA)`.
    pub fn name(&self) -> String {
        match self {
            ProbeEngine::OnnxRuntime {
                provider: provider @ (Provider::Cuda | Provider::TensorRt),
                ..
            } => format!("{} ({provider})", self.backend()),
            _ => self.backend().to_string(),
        }
    }
}

/// The engines to probe a model with, for the backend the config chose
/// and ONNX Runtime's provider (as the daemon resolves it): those the
/// daemon may run it on. TensorRT falls back to tract; `auto` may pick
/// ONNX Runtime or tract. ONNX Runtime's CUDA provider comes after its CPU
/// one, whose probe bounds the model's memory.
pub fn engines_to_probe(
    choice: BackendChoice,
    library: Option<&Path>,
    provider: Provider,
) -> Vec<ProbeEngine> {
    let onnxruntime = |provider| ProbeEngine::OnnxRuntime {
        library: library.map(Path::to_path_buf),
        provider,
    };
    let mut engines = match choice {
        BackendChoice::Only(BackendKind::OnnxRuntime) => vec![onnxruntime(Provider::Cpu)],
        BackendChoice::Auto => vec![ProbeEngine::Tract, onnxruntime(Provider::Cpu)],
        BackendChoice::Only(_) => return vec![ProbeEngine::Tract],
    };
    if provider == Provider::Cuda {
        engines.push(onnxruntime(Provider::Cuda));
    }
    engines
}

/// The probe's address-space limit: tract runs NanoDet-Plus 416 in well
/// under 1 GiB.
pub const PROBE_ADDRESS_SPACE: u64 = 4 << 30;
/// The longest a probe may take; tract loads and runs NanoDet in about a
/// second on a desktop, tens of seconds on the slowest edge boards.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(300);
/// The exit code with which a probe refuses a model cleanly.
pub const PROBE_REFUSED: i32 = 2;

/// How a probe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// It exited with this code.
    Exited(i32),
    /// A signal ended it (an abort, a segfault, the OOM killer).
    Signaled(String),
    /// It ran past [`PROBE_TIMEOUT`] and was killed.
    TimedOut,
    /// It could not be started at all.
    NotStarted(String),
}

/// Why a model was refused without being loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a trial load in a child process {what}; the model is not loaded (it would have taken the daemon down)"
)]
pub struct ProbeRefusal {
    /// What happened to the child.
    pub what: String,
}

/// The verdict on a probe's outcome: only a crash refuses the model. A
/// probe that could not start is let through with a warning, since the
/// daemon must still load models when, say, its binary was replaced by an
/// upgrade while it ran.
pub fn verdict(outcome: &ProbeOutcome) -> Result<Option<String>, ProbeRefusal> {
    match outcome {
        ProbeOutcome::Exited(0) | ProbeOutcome::Exited(PROBE_REFUSED) => Ok(None),
        ProbeOutcome::Exited(code) => Err(ProbeRefusal {
            what: format!("exited {code}"),
        }),
        ProbeOutcome::Signaled(signal) => Err(ProbeRefusal {
            what: format!("was killed by {signal}"),
        }),
        ProbeOutcome::TimedOut => Err(ProbeRefusal {
            what: format!("took over {} s", PROBE_TIMEOUT.as_secs()),
        }),
        ProbeOutcome::NotStarted(why) => Ok(Some(format!(
            "cannot start the trial load of the model ({why}); loading it untried"
        ))),
    }
}

/// Runs `exe probe-model` on `model` with `engine` and waits for it.
pub fn run_probe(exe: &Path, model: &Path, engine: &ProbeEngine) -> ProbeOutcome {
    use std::os::unix::process::ExitStatusExt;
    let limit: Vec<OsString> = if engine.bounded() {
        vec![
            "--max-memory".into(),
            PROBE_ADDRESS_SPACE.to_string().into(),
        ]
    } else {
        Vec::new()
    };
    let child = Command::new(exe)
        .arg("probe-model")
        .args(limit)
        .args(engine.args())
        .arg(model)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return ProbeOutcome::NotStarted(e.to_string()),
    };
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return match (status.code(), status.signal()) {
                    // 126 and 127 are how an exec that failed in the child
                    // is reported where the spawn itself cannot see it
                    // (glibc's posix_spawn under some sandboxes, a
                    // wrapper shell); `probe-model` never exits with them.
                    (Some(code @ (126 | 127)), _) => ProbeOutcome::NotStarted(format!(
                        "it exited {code}: the executable could not be run"
                    )),
                    (Some(code), _) => ProbeOutcome::Exited(code),
                    (None, Some(signal)) => ProbeOutcome::Signaled(
                        nix::sys::signal::Signal::try_from(signal)
                            .map_or_else(|_| format!("signal {signal}"), |s| s.to_string()),
                    ),
                    (None, None) => ProbeOutcome::Signaled("an unknown signal".into()),
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return ProbeOutcome::TimedOut;
            }
            Err(e) => return ProbeOutcome::NotStarted(e.to_string()),
        }
    }
}

/// The executable that probes models: this one, as the daemon runs.
pub fn probe_executable() -> Option<PathBuf> {
    std::env::current_exe().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_crashed_or_hung_probe_refuses_the_model() {
        assert_eq!(verdict(&ProbeOutcome::Exited(0)), Ok(None));
        assert_eq!(verdict(&ProbeOutcome::Exited(PROBE_REFUSED)), Ok(None));
        let refusal = verdict(&ProbeOutcome::Signaled("SIGABRT".into())).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "a trial load in a child process was killed by SIGABRT; the model is not loaded (it would have taken the daemon down)"
        );
        assert!(verdict(&ProbeOutcome::Exited(101)).is_err());
        assert!(
            verdict(&ProbeOutcome::TimedOut)
                .unwrap_err()
                .what
                .contains("300 s")
        );
        let warning = verdict(&ProbeOutcome::NotStarted("gone".into()))
            .unwrap()
            .unwrap();
        assert!(warning.contains("loading it untried"), "{warning}");
    }

    #[test]
    fn the_engines_probed_are_those_the_daemon_may_run() {
        let lib = Path::new("/opt/ort/libonnxruntime.so");
        let ort = |provider| ProbeEngine::OnnxRuntime {
            library: Some(lib.to_path_buf()),
            provider,
        };
        let (cpu, cuda) = (ort(Provider::Cpu), ort(Provider::Cuda));
        let only = BackendChoice::Only;
        let probed = |choice, provider| engines_to_probe(choice, Some(lib), provider);
        for provider in [Provider::Cpu, Provider::Cuda] {
            assert_eq!(
                probed(only(BackendKind::Tract), provider),
                [ProbeEngine::Tract]
            );
            assert_eq!(
                probed(only(BackendKind::TensorRt), provider),
                [ProbeEngine::Tract],
                "TensorRT falls back to tract"
            );
        }
        assert_eq!(
            probed(only(BackendKind::OnnxRuntime), Provider::Cpu),
            std::slice::from_ref(&cpu)
        );
        // The CPU first: its probe bounds the model's memory.
        assert_eq!(
            probed(only(BackendKind::OnnxRuntime), Provider::Cuda),
            [cpu.clone(), cuda.clone()]
        );
        assert_eq!(
            probed(BackendChoice::Auto, Provider::Cpu),
            [ProbeEngine::Tract, cpu.clone()]
        );
        assert_eq!(
            probed(BackendChoice::Auto, Provider::Cuda),
            [ProbeEngine::Tract, cpu.clone(), cuda.clone()]
        );
        // TensorRT's provider builds for minutes: not probed.
        assert_eq!(
            probed(only(BackendKind::OnnxRuntime), Provider::TensorRt),
            std::slice::from_ref(&cpu)
        );
        assert_eq!(
            cpu.args(),
            [
                "--onnxruntime",
                "--onnxruntime-library",
                "/opt/ort/libonnxruntime.so"
            ]
            .map(OsString::from)
        );
        assert_eq!(
            cuda.args(),
            [
                "--onnxruntime",
                "--onnxruntime-library",
                "/opt/ort/libonnxruntime.so",
                "--provider",
                "cuda"
            ]
            .map(OsString::from)
        );
        assert!(ProbeEngine::Tract.args().is_empty());
        assert_eq!(
            [&ProbeEngine::Tract, &cpu, &cuda].map(ProbeEngine::name),
            ["tract", "onnxruntime", "onnxruntime (CUDA)"]
        );
        assert!(ProbeEngine::Tract.bounded() && cpu.bounded() && !cuda.bounded());
    }

    /// The real child: a missing executable is "not started", and an
    /// executable that is killed by a signal is a refusal.
    #[test]
    fn a_child_killed_by_a_signal_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        // Where exec fails is seen at the spawn on most machines; CI's saw
        // a successful spawn and an exit of 127 instead. Both are "not
        // started", so an upgrade that replaced the binary never refuses
        // a model.
        let missing = run_probe(
            &dir.path().join("missing"),
            Path::new("m.onnx"),
            &ProbeEngine::Tract,
        );
        assert!(
            matches!(missing, ProbeOutcome::NotStarted(_)),
            "{missing:?}"
        );
        let not_found = script(dir.path(), "not-found.sh", "exit 127");
        let outcome = run_script_probe(&not_found);
        assert!(
            matches!(outcome, ProbeOutcome::NotStarted(ref why) if why.contains("exited 127")),
            "{outcome:?}"
        );
        let abort = script(dir.path(), "abort.sh", "kill -ABRT $$");
        assert_eq!(
            run_script_probe(&abort),
            ProbeOutcome::Signaled("SIGABRT".into())
        );
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A script just written can be "busy" for a moment: another test's
    /// fork may hold its descriptor until that child execs.
    fn run_script_probe(script: &Path) -> ProbeOutcome {
        let probe = || run_probe(script, Path::new("m.onnx"), &ProbeEngine::Tract);
        let mut outcome = probe();
        for _ in 0..50 {
            match &outcome {
                ProbeOutcome::NotStarted(why) if why.contains("busy") => {
                    std::thread::sleep(Duration::from_millis(20));
                    outcome = probe();
                }
                _ => break,
            }
        }
        outcome
    }
}
