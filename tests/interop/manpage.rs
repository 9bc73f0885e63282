//! The man page and `--help` cannot drift: every option `--help` lists (for the helper and
//! each subcommand) and every control command the helper knows appears in the man page.

use std::process::Command;

use support::helper::helper_bin;

fn man() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/man/qemu-migration-helper.1"
    ))
    .expect("man/qemu-migration-helper.1")
    // roff escapes the dashes of options.
    .replace("\\-", "-")
}

fn options(args: &[&str]) -> Vec<String> {
    let out = Command::new(helper_bin())
        .args(args)
        .output()
        .expect("--help");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches([',', '.'])
                .split('=')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[test]
fn man_page_lists_every_option() {
    let man = man();
    for args in [
        vec!["--help"],
        vec!["analyze", "--help"],
        vec!["demo", "--help"],
    ] {
        let opts = options(&args);
        assert!(!opts.is_empty());
        for o in opts {
            assert!(
                man.contains(&o),
                "{o} (from {args:?}) is not in the man page"
            );
        }
    }
}

#[test]
fn man_page_lists_every_command() {
    let man = man();
    for c in qemu_migration_helper::control::protocol::COMMANDS {
        assert!(
            man.contains(c),
            "control command {c} is not in the man page"
        );
    }
    for e in [
        "MIGRATION",
        "MIGRATION_PASS",
        "EXIT STATUS",
        "FILES",
        "EXAMPLES",
    ] {
        assert!(man.contains(e), "{e} is not in the man page");
    }
}

#[test]
fn man_page_renders() {
    // groff/man are not needed for the build; when present, the page must render cleanly.
    let Ok(out) = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/man/qemu-migration-helper.1"
        ))
        .output()
    else {
        eprintln!("SKIP man_page_renders: groff is not installed");
        return;
    };
    assert!(out.status.success());
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(warnings.trim().is_empty(), "groff warnings: {warnings}");
}
