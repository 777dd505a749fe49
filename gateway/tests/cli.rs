//! The binary refuses bad configuration with a clear message and exit code 2.

use std::process::Command;

fn gateway() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_devgate-gateway"));
    for (key, _) in std::env::vars() {
        if key.starts_with("DEVGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

#[test]
fn refuses_to_start_without_device_auth() {
    let out = gateway().output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--auth-secret") && err.contains("--insecure-no-auth"),
        "{err}"
    );
}

#[test]
fn env_vars_are_read_and_validated() {
    let out = gateway()
        .env("DEVGATE_AUTH_SECRET", "short")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16 characters"));
}

#[test]
fn unknown_config_file_keys_are_named() {
    let dir = std::env::temp_dir().join(format!("devgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nheartbeat_sec = 5\n").expect("write");
    let out = gateway()
        .arg("--config")
        .arg(&file)
        .arg("--insecure-no-auth")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("heartbeat_sec"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn devsim_explains_itself() {
    let out = Command::new(env!("CARGO_BIN_EXE_devsim"))
        .arg("--help")
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--devices"));
}
