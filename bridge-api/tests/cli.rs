//! The binary's command line: the OpenAPI flag and configuration errors.

use std::process::Command;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_devgate-bridge-api"));
    // Keep the caller's environment from configuring the binary under test.
    for (key, _) in std::env::vars() {
        if key.starts_with("DEVGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

#[test]
fn print_openapi_prints_the_committed_document() {
    let out = bin().arg("--print-openapi").output().expect("runs");
    assert!(out.status.success());
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))
        .expect("committed openapi.json");
    assert_eq!(String::from_utf8_lossy(&out.stdout), committed);
}

#[test]
fn refuses_to_start_without_a_token_and_says_how_to_fix_it() {
    let out = bin().output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api-token") && err.contains("--insecure-no-auth"),
        "{err}"
    );

    let out = bin()
        .env("DEVGATE_API_TOKEN", "short")
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 16"), "{err}");
}

#[test]
fn bad_flag_values_are_refused_by_name() {
    let out = bin()
        .args(["--insecure-no-auth", "--listen", "not-an-address"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen"), "{err}");
}
