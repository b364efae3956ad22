fn main() -> std::process::ExitCode {
    cloud_bridge::cli::main()
}
