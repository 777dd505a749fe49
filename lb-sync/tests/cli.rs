//! The binary refuses bad configuration with a clear message and a non-zero exit, before
//! touching anything.

use std::process::{Command, Output};

fn lb_sync(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_devgate-lb-sync"));
    cmd.args(args);
    // Keep the caller's DEVGATE_* variables out of the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("DEVGATE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run devgate-lb-sync")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn missing_output_is_a_clear_error() {
    let out = lb_sync(&[], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--output"), "{}", stderr(&out));
}

#[test]
fn bad_static_endpoint_is_named() {
    let out = lb_sync(
        &[
            "--source",
            "static",
            "--static-endpoints",
            "gateway-1:7000",
            "--output",
            "/tmp/x.conf",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("gateway-1:7000"), "{}", stderr(&out));
}

#[test]
fn env_vars_are_read_too() {
    let out = lb_sync(
        &[],
        &[("DEVGATE_SOURCE", "kube"), ("DEVGATE_SINK", "configmap")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--configmap-name"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_values_and_config_keys_are_refused() {
    let out = lb_sync(&["--sink", "s3"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("s3"), "{}", stderr(&out));

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("lb.toml");
    std::fs::write(&file, "reload_command = \"nginx -s reload\"\n").expect("write");
    let out = lb_sync(&["--config", file.to_str().expect("utf8")], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("reload_command"), "{}", stderr(&out));
}

#[test]
fn no_kubernetes_is_a_clear_error_for_the_kube_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = lb_sync(
        &[
            "--source",
            "kube",
            "--insecure-plaintext",
            "--output",
            dir.path().join("u.conf").to_str().expect("utf8"),
        ],
        &[
            ("KUBECONFIG", "/nonexistent/kubeconfig"),
            ("HOME", "/nonexistent"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Kubernetes client"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn help_lists_the_flags() {
    let out = lb_sync(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--source",
        "--sink",
        "--listen",
        "--output",
        "--reload-cmd",
        "--nats-url",
        "--static-endpoints",
        "--kube-namespace",
        "--kube-service",
        "--configmap-name",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}
