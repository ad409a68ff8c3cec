//! The `nanodetd` binary: argument parsing and exit codes only; the work
//! is in the library and in `cli`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
