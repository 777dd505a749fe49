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

#[test]
fn tls_passthrough_is_read_from_its_flag_and_env_var() {
    let contradiction = "tls_passthrough contradicts insecure_plaintext";
    let args = ["--insecure-plaintext", "--output", "/tmp/x.conf"];
    let mut with_flag = vec!["--tls-passthrough"];
    with_flag.extend(args);
    let out = lb_sync(&with_flag, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(contradiction), "{}", stderr(&out));

    let out = lb_sync(&args, &[("DEVGATE_TLS_PASSTHROUGH", "true")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(contradiction), "{}", stderr(&out));
}

/// A started lb-sync that is killed when dropped, so a failed assertion leaves no process behind.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tls_passthrough_starts_with_an_info_line_and_no_insecure_warning() {
    use std::io::BufRead as _;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("upstream.conf");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_devgate-lb-sync"));
    cmd.args([
        "--tls-passthrough",
        "--source",
        "static",
        "--static-endpoints",
        "127.0.0.1:7001",
        "--output",
        output.to_str().expect("utf8"),
        "--validate-cmd",
        "true",
        "--reload-cmd",
        "true",
        "--http-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]);
    for (k, _) in std::env::vars() {
        if k.starts_with("DEVGATE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut running = Running(cmd.spawn().expect("start devgate-lb-sync"));
    let stdout = running.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.contains("lb-sync started")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(e) => panic!("no \"lb-sync started\" ({e}); log so far: {log:#?}"),
        }
    }
    let passthrough: Vec<_> = log
        .iter()
        .filter(|l| l.contains("device TLS passes through nginx to the gateways"))
        .collect();
    assert_eq!(passthrough.len(), 1, "{log:#?}");
    assert!(passthrough[0].contains("\"level\":\"INFO\""), "{log:#?}");
    assert!(
        passthrough[0].contains("\"listen\":\"0.0.0.0:7000\""),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("INSECURE")),
        "no INSECURE warning when TLS passes through: {log:#?}"
    );

    let text = loop {
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        if text.contains("proxy_pass") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            output.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        text.contains("# No ssl: device TLS passes through to the gateways"),
        "{text}"
    );
    assert!(!text.contains(" ssl;"), "{text}");
}
