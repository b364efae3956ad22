//! `cloud-bridge` as the fault-injection tests run it.
fn main() -> std::process::ExitCode {
    cloud_bridge::cli::main()
}
