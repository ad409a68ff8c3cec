//! Scripts that must never act outside the machine they were written for.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

/// tests/v4l2-vm/guest-init.sh is the test VM's /init: on a host it would
/// mount over /tmp and /run, load modules, overwrite /dev/vda and power
/// off. Started here, it must refuse before doing anything. Run as nobody
/// when the test is root, so that a broken guard still could not harm
/// this machine (mount, insmod, /dev/vda and poweroff all need root).
#[test]
fn the_vm_init_script_refuses_to_run_on_a_host() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/v4l2-vm/guest-init.sh");
    let mut command = if running_as_root() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--no-new-privs",
            "/bin/sh",
        ]);
        c
    } else {
        Command::new("/bin/sh")
    };
    let out = command
        .arg(&script)
        .env("PATH", "/nonexistent")
        .current_dir("/")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("guest-init.sh: refusing to run")
            && stderr.contains("runs only as PID 1 of its initramfs"),
        "{stderr}"
    );
    // It stopped at the guard: nothing it does after it (busybox --install
    // first) printed or ran.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// The inner half of scripts/fresh-machine.sh runs inside the fresh root
/// only, where fresh-machine.sh leaves its marker.
#[test]
fn the_fresh_root_script_refuses_to_run_outside_its_root() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fresh-machine-inside.sh");
    // Inside the fresh root (whose test run reaches here too) the marker
    // file exists; without the variable the script must still refuse.
    let out = Command::new("bash")
        .arg(&script)
        .env_remove("NANODETD_FRESH_ROOT")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("refusing to run"), "{stderr}");
    assert!(out.stdout.is_empty());
}

fn running_as_root() -> bool {
    // The tests' own uid, without a dependency: `id -u`.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}
