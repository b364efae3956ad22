//! `edge-agent` with the crash points of `edge_agent::fault` compiled in.
fn main() -> std::process::ExitCode {
    edge_agent::cli::main()
}
