fn main() -> std::process::ExitCode {
    edge_agent::cli::main()
}
