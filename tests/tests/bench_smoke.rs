//! Smoke runs of the load tool (`devgate-bench`) against a real in-process gateway and a real
//! nats-server: small and short, asserting the tool measures something sane, not how fast.

use std::time::Duration;

use devgate_gateway::bench::suite;
use devgate_gateway::common::Secret;
use devgate_tests::NatsServer;
use devgate_tests::bins::workspace_bin;
use devgate_tests::gateway::{SECRET, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_drives_logins_downlink_and_uplink_through_a_real_gateway() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-bench").await;
    let (down, up, storm) = tokio::time::timeout(
        Duration::from_secs(60),
        suite::smoke(
            gw.device_addr(),
            &nats.url(),
            Some(Secret::new(SECRET)),
            50,
            Duration::from_secs(1),
        ),
    )
    .await
    .expect("smoke run finishes in time")
    .expect("smoke run succeeds");

    assert_eq!((storm.ok, storm.failed), (50, 0), "{storm:?}");
    assert!(storm.per_s > 0.0, "{storm:?}");

    assert!(down.sent > 0, "{down:?}");
    assert_eq!(
        down.delivered, down.sent,
        "paced downlink loses nothing: {down:?}"
    );
    assert!(down.per_s > 0.0, "{down:?}");
    assert!(
        down.p50_us > 0.0 && down.p99_us >= down.p50_us && down.p999_us >= down.p99_us,
        "latency percentiles are ordered and non-zero: {down:?}"
    );

    assert!(up.delivered > 0, "{up:?}");
    assert!(up.sent >= up.delivered, "{up:?}");
    assert!(up.p50_us > 0.0, "{up:?}");
    gw.shutdown().await.expect("gateway stops");
}

#[tokio::test]
async fn devgate_bench_devices_logs_a_fleet_in_holds_it_and_exits_cleanly() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-bench-cli").await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(workspace_bin("devgate-bench"))
            .args([
                "devices",
                "--gateway",
                &gw.device_addr().to_string(),
                "--devices",
                "50",
                "--duration-s",
                "1",
            ])
            .env("DEVGATE_AUTH_SECRET", SECRET)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("devgate-bench exits in time")
    .expect("devgate-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("50 devices logged in"), "{stderr}");
    assert!(stderr.contains("0 failed"), "{stderr}");
    assert!(stderr.contains("connected=50"), "{stderr}");
    gw.shutdown().await.expect("gateway stops");
}

#[tokio::test]
async fn devgate_bench_suite_rejects_a_bad_configuration_before_starting_anything() {
    let out = tokio::process::Command::new(workspace_bin("devgate-bench"))
        .args([
            "suite",
            "--procs",
            "0",
            "--sessions",
            "5000,1000",
            "--latency-sweep",
            "20000,10000",
        ])
        .output()
        .await
        .expect("devgate-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("procs must be 1..=200"), "{stderr}");
    assert!(
        stderr.contains("sessions must be a non-empty increasing list"),
        "{stderr}"
    );
    assert!(
        stderr.contains("latency_sweep must be increasing rates > 0"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_spread_floor_sink_receives_every_subject_it_subscribed() {
    use devgate_gateway::bench::{fleet::stamped, load};
    let nats = NatsServer::start();
    let subjects: Vec<async_nats::Subject> = (0..300)
        .map(|n| format!("device.floor-{n}.down").into())
        .collect();
    let sink = load::nats_spread_sink(&nats.url(), &subjects)
        .await
        .expect("sink subscribes");
    let publisher = async_nats::connect(nats.url()).await.expect("publisher");
    for subject in &subjects {
        publisher
            .publish(subject.clone(), stamped(32))
            .await
            .expect("publish");
    }
    publisher.flush().await.expect("flush");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sink.count() < 300 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sink.count(), 300, "one message per subscribed subject");
    assert!(
        sink.latency(false).quantile(0.5) > 0,
        "latency is recorded from the stamp"
    );
}
