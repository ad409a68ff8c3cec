//! Records sd_notify datagrams the way systemd receives them: binds a
//! Unix datagram socket and prints each message with the system uptime
//! (seconds, from /proc/uptime) it arrived at, one line per field. Used
//! inside the V4L2 test VM (tests/v4l2-vm), where there is no systemd, to
//! check that watchdog pings go on while a camera is unplugged.
//!
//! Usage: notify_recorder SOCKET_PATH

use std::os::unix::net::UnixDatagram;

fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, path] = &args[..] else {
        eprintln!("usage: notify_recorder SOCKET_PATH");
        return std::process::ExitCode::from(64);
    };
    let _ = std::fs::remove_file(path);
    let socket = match UnixDatagram::bind(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("notify_recorder: {path}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("notify_recorder: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let now = uptime();
        for field in String::from_utf8_lossy(&buf[..n]).lines() {
            println!("{now} {field}");
        }
    }
}
