//! The `qemu-migration-helper` command (see src/cli.rs).

fn main() -> std::process::ExitCode {
    qemu_migration_helper::cli::main()
}
