//! The `adclick` binary: see `adclick --help`.
fn main() -> std::process::ExitCode {
    match adclick::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("adclick: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
