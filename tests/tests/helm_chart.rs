//! The Helm chart (`helm/devgate`), checked with real tools since no cluster runs here:
//! `helm lint --strict` and `helm template` (helm v4) for the default values and every
//! documented combination in `helm/devgate/ci/`, `kubernetes-validate` (the Kubernetes OpenAPI
//! schemas, offline, strict) on every rendered manifest, the real `nats-server -t` on the
//! rendered NATS configuration with the pod's environment, the real `nginx -t` on the rendered
//! nginx configuration through lb-sync's own validate command, the real nginx running it as the
//! nginx container does (its liveness port before lb-sync's first apply), and lb-sync's RBAC against the
//! calls its code makes. What an upgrade reads back from the cluster (`lookup`) is answered
//! from a file standing in for it. Tools come from `bash .ci/install-tools`; a missing one fails
//! the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use devgate_tests::bins::{installed_tool, tool, workspace_root};
use devgate_tests::helm::{
    Combo, NAMESPACE, RELEASE, assert_refused, chart, combo, combos, full, helm_bin, kind, one,
    parse, render, run, template, text, try_template, try_template_of, values_args,
};

/// The Kubernetes version the manifests are validated against: the one the workspace's
/// k8s-openapi feature (`v1_33`) targets.
const KUBERNETES_VERSION: &str = "1.33.0";
/// The Debian nginx used by the tests loads the stream module dynamically; the official image
/// (the chart's default) has it built in.
const DEBIAN_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// A container's literal env values (`value:` entries).
fn env_values(c: &Value) -> BTreeMap<String, String> {
    c["env"]
        .as_array()
        .map(|env| {
            env.iter()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_owned(),
                        e["value"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn env_value(c: &Value, name: &str) -> String {
    env_values(c)
        .remove(name)
        .unwrap_or_else(|| panic!("env {name} missing in container {}", c["name"]))
}

/// Every pod template of the render (Deployments and StatefulSets).
fn pod_specs(docs: &[Value]) -> Vec<(&Value, &Value)> {
    docs.iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
        .map(|d| (d, &d["spec"]["template"]["spec"]))
        .collect()
}

#[test]
fn every_documented_combination_lints_and_validates_against_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deploy_doc =
        std::fs::read_to_string(workspace_root().join("docs/deploy.md")).expect("docs/deploy.md");
    let mut files = Vec::new();
    let mut expected_passes = 0;
    for c in combos() {
        if let Some(f) = &c.file {
            let file_name = f.file_name().and_then(|n| n.to_str()).expect("name");
            assert!(
                deploy_doc.contains(file_name),
                "docs/deploy.md does not document ci/{file_name}"
            );
        }
        let lint = run(Command::new(helm_bin())
            .args(["lint", "--strict"])
            .arg(chart())
            .args(["--namespace", NAMESPACE])
            .args(values_args(&c, &[])));
        assert!(
            lint.status.success(),
            "helm lint --strict ({}) failed:\n{}",
            c.name,
            text(&lint)
        );
        let yaml = template(&c, &[]);
        let docs = parse(&yaml);
        check_monitors(&docs);
        let custom = docs
            .iter()
            .filter(|d| PROMETHEUS_OPERATOR_KINDS.contains(&d["kind"].as_str().unwrap_or("")))
            .count();
        expected_passes += docs.len() - custom;
        let path = dir.path().join(format!("{}.yaml", c.name));
        std::fs::write(&path, yaml).expect("write render");
        files.push(path);
    }
    let out = run(Command::new(installed_tool(
        "kubernetes-validate",
        "KUBERNETES_VALIDATE_BIN",
    ))
    .args(["--strict", "-k", KUBERNETES_VERSION])
    .args(&files));
    let report = text(&out);
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{report}"
    );
    let mut passes = 0;
    for line in report.lines() {
        if line.starts_with("INFO") && line.contains(" passed for resource ") {
            passes += 1;
        } else if line.starts_with("WARN") {
            // The custom resources: prometheus-operator's kinds have no schema in the
            // Kubernetes OpenAPI; check_monitors and the alert tests check them instead.
            assert!(
                PROMETHEUS_OPERATOR_KINDS.iter().any(|k| {
                    line.contains(&format!(
                    "Couldn't find schema for kind {k} with api version monitoring.coreos.com/v1"
                ))
                }),
                "unexpected warning: {line}"
            );
        } else if !line.trim().is_empty() {
            panic!("unexpected kubernetes-validate output: {line}");
        }
    }
    assert_eq!(
        passes, expected_passes,
        "every rendered resource must pass:\n{report}"
    );
}

/// The custom resources the chart renders for prometheus-operator (`metrics.*`).
const PROMETHEUS_OPERATOR_KINDS: [&str; 3] = ["ServiceMonitor", "PodMonitor", "PrometheusRule"];

/// Every ServiceMonitor selects a rendered Service that has the port it scrapes, every
/// PodMonitor a rendered pod template with a container port of that name, and each sets the
/// `job` of its targets to `<fullname>-<component>`, the job the alerts and the dashboard use.
fn check_monitors(docs: &[Value]) {
    for m in kind(docs, "ServiceMonitor") {
        assert_eq!(m["apiVersion"], "monitoring.coreos.com/v1");
        let selector = &m["spec"]["selector"]["matchLabels"];
        let port = &m["spec"]["endpoints"][0]["port"];
        let service = kind(docs, "Service")
            .into_iter()
            .find(|s| labels_match(selector, &s["metadata"]["labels"]))
            .unwrap_or_else(|| {
                panic!(
                    "ServiceMonitor {} selects no Service",
                    m["metadata"]["name"]
                )
            });
        assert!(
            service["spec"]["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .any(|p| &p["name"] == port),
            "Service {} has no port {port}",
            service["metadata"]["name"]
        );
        check_monitor_job(m, &m["spec"]["endpoints"][0]);
    }
    for m in kind(docs, "PodMonitor") {
        assert_eq!(m["apiVersion"], "monitoring.coreos.com/v1");
        let selector = &m["spec"]["selector"]["matchLabels"];
        let endpoint = &m["spec"]["podMetricsEndpoints"][0];
        let pods: Vec<_> = pod_specs(docs)
            .into_iter()
            .filter(|(w, _)| labels_match(selector, &w["spec"]["template"]["metadata"]["labels"]))
            .collect();
        assert!(
            !pods.is_empty(),
            "PodMonitor {} selects no pod",
            m["metadata"]["name"]
        );
        for (w, spec) in pods {
            let named: Vec<&str> = spec["containers"]
                .as_array()
                .expect("containers")
                .iter()
                .filter(|c| {
                    c["ports"]
                        .as_array()
                        .is_some_and(|ports| ports.iter().any(|p| p["name"] == endpoint["port"]))
                })
                .filter_map(|c| c["name"].as_str())
                .collect();
            // One container answers the port name, and it is the monitored component's.
            assert_eq!(
                named,
                vec![
                    m["metadata"]["labels"]["app.kubernetes.io/component"]
                        .as_str()
                        .expect("component")
                ],
                "{}: containers with port {}",
                w["metadata"]["name"],
                endpoint["port"]
            );
        }
        check_monitor_job(m, endpoint);
    }
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .expect("matchLabels")
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

fn check_monitor_job(monitor: &Value, endpoint: &Value) {
    let component = monitor["metadata"]["labels"]["app.kubernetes.io/component"]
        .as_str()
        .expect("component label");
    assert_eq!(
        endpoint["relabelings"],
        json!([{"action": "replace", "targetLabel": "job", "replacement": full(component)}]),
        "{} must name its job",
        monitor["metadata"]["name"]
    );
}

/// The address [`pod_env`] gives a pod (`status.podIP`).
const POD_IP: &str = "10.244.1.7";

/// The Kubernetes `$(VAR)` expansion of env values, in order, as the kubelet does it. A Secret
/// key that is missing is an error unless the reference is `optional`; then, as the kubelet
/// does, the variable is not set.
fn pod_env(c: &Value, secret: &BTreeMap<String, String>, pod_name: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("name").to_owned();
        let secret_ref = &e["valueFrom"]["secretKeyRef"];
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_owned();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            v
        } else if let Some(key) = secret_ref["key"].as_str() {
            match secret.get(key) {
                Some(v) => v.clone(),
                None if secret_ref["optional"] == true => continue,
                None => panic!("Secret has no key {key}"),
            }
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            pod_name.to_owned()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" {
            POD_IP.to_owned()
        } else {
            panic!("unexpected env source {e}");
        };
        env.push((name, value));
    }
    env
}

/// The rendered Secret's data, decoded.
fn secret_data(docs: &[Value]) -> BTreeMap<String, String> {
    let secret = one(docs, "Secret", RELEASE);
    secret["data"]
        .as_object()
        .expect("data")
        .iter()
        .map(|(k, v)| {
            let bytes = base64_decode(v.as_str().expect("string"));
            (k.clone(), String::from_utf8(bytes).expect("utf8"))
        })
        .collect()
}

/// Standard base64 (with padding), enough for Secret data.
fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .unwrap_or_else(|| panic!("not base64: {s}")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn the_rendered_nats_config_is_accepted_by_nats_server() {
    for name in [
        "default",
        "autoscaling-monitoring-values",
        "nats-tls-values",
    ] {
        let tls = name == "nats-tls-values";
        let docs = render(&combo(name), &[]);
        let nats = full("nats");
        let cm = one(&docs, "ConfigMap", &nats);
        let dir = tempfile::tempdir().expect("tempdir");
        for (file, content) in cm["data"].as_object().expect("data") {
            let content = content.as_str().expect("text");
            // The chart ships the repository's files unchanged: no second copy to drift.
            let original = std::fs::read_to_string(workspace_root().join("nats").join(file))
                .unwrap_or_else(|e| panic!("nats/{file}: {e}"));
            assert_eq!(
                content, original,
                "ConfigMap key {file} differs from nats/{file}"
            );
            std::fs::write(dir.path().join(file), content).expect("write");
        }
        let sts = one(&docs, "StatefulSet", &nats);
        let c = container(sts, "nats");
        let conf = if tls {
            "cluster-tls.conf"
        } else {
            "cluster.conf"
        };
        assert_eq!(
            c["command"],
            json!([
                "nats-server",
                "--config",
                format!("/etc/nats-config/{conf}")
            ])
        );
        let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
        let mut env = pod_env(c, &secret_data(&docs), &format!("{nats}-0"));
        // The node's certificate, key and CA at the paths its environment names; here the
        // test-only ones stand in for them.
        let tls_files = [
            ("/etc/nats-tls/tls.crt", "server.pem"),
            ("/etc/nats-tls/tls.key", "server.key"),
            ("/etc/nats-tls/ca.crt", "ca.pem"),
        ];
        for (_, value) in &mut env {
            if let Some((_, fixture)) = tls_files.iter().find(|(path, _)| value == path) {
                *value = workspace_root()
                    .join("tests/fixtures/tls")
                    .join(fixture)
                    .display()
                    .to_string();
            }
        }
        let mounted_tls = sts["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "tls")
            .map(|v| v["secret"].clone());
        assert_eq!(
            mounted_tls,
            tls.then(|| json!({
                "secretName": "devgate-nats-tls",
                "defaultMode": 0o440,
                "items": [
                    {"key": "tls.crt", "path": "tls.crt"},
                    {"key": "tls.key", "path": "tls.key"},
                    {"key": "ca.crt", "path": "ca.crt"},
                ],
            })),
            "{name}"
        );
        let routes = &env
            .iter()
            .find(|(k, _)| k == "NATS_ROUTES")
            .expect("routes")
            .1;
        assert_eq!(
            routes.matches("nats://route:").count() as u64,
            replicas,
            "{routes}"
        );
        assert!(!routes.contains("$("), "unexpanded variable in {routes}");
        let out = run(Command::new(tool("nats-server", "NATS_SERVER_BIN"))
            .arg("-t")
            .arg("-c")
            .arg(dir.path().join(conf))
            .env_clear()
            .envs(env));
        assert!(
            out.status.success(),
            "nats-server -t refused the rendered config ({name}):\n{}",
            text(&out)
        );
    }
}

/// Runs a command line from the chart (split on whitespace, as lb-sync does), with the pod's
/// paths moved under `root`.
fn run_pod_command(cmd: &str, root: &Path) -> Output {
    let argv: Vec<String> = cmd.split_whitespace().map(|a| relocate(a, root)).collect();
    let (program, args) = argv.split_first().expect("non-empty command");
    assert_eq!(program, "nginx", "lb-sync's commands run nginx");
    run(Command::new(tool("nginx", "NGINX_BIN")).args(args))
}

/// The nginx pod's absolute paths (and the gateway pod's device TLS directories), moved under
/// a test directory.
fn relocate(s: &str, root: &Path) -> String {
    [
        "/etc/devgate-nginx",
        "/var/lib/devgate-nginx",
        "/var/run/devgate-nginx",
        "/etc/devgate-device-tls",
        "/etc/devgate-device-ca",
        GATEWAY_DEVICE_TLS_DIR,
        GATEWAY_DEVICE_CLIENT_CA_DIR,
    ]
    .iter()
    .fold(s.to_owned(), |s, p| {
        s.replace(p, &format!("{}{p}", root.display()))
    })
}

/// The command line that means the same as a container's `DEVGATE_*` env: `program`, then each
/// `DEVGATE_X` as `--x` (the flag that reads that variable) with its value.
fn env_flags(program: &str, env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let mut args = vec![program.to_owned()];
    for (name, value) in env {
        let flag = name
            .strip_prefix("DEVGATE_")
            .unwrap_or_else(|| panic!("{program} env {name} is not a DEVGATE_ setting"))
            .to_lowercase()
            .replace('_', "-");
        args.push(format!("--{flag}"));
        args.push(value);
    }
    args
}

/// lb-sync's configuration in the pod: parsed from the container's env ([`env_flags`]) with the
/// pod's paths moved under `root`, and checked by lb-sync's own validation, as at its start.
fn lb_sync_config(lb: &Value, root: &Path) -> devgate_lb_sync::config::Config {
    let args = env_flags(
        "devgate-lb-sync",
        env_values(lb)
            .into_iter()
            .map(|(name, value)| (name, relocate(&value, root))),
    );
    let cli = <devgate_lb_sync::config::Cli as clap::Parser>::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("lb-sync refuses the chart's env {args:?}: {e}"));
    cli.into_config()
        .unwrap_or_else(|e| panic!("lb-sync refuses the chart's settings: {e}"))
}

/// What lb-sync renders in the pod ([`lb_sync_config`]) with one ready gateway.
fn lb_sync_render(lb: &Value, root: &Path) -> String {
    use devgate_lb_sync::endpoints::{DesiredSet, Endpoint, EndpointState};
    let mut settings = lb_sync_config(lb, root).render_settings();
    if let Some(tls) = settings.tls.as_mut() {
        let files = tls.files();
        tls.fingerprint = devgate_lb_sync::tls::fingerprint(&files).expect("TLS files readable");
    }
    let gateway = Endpoint {
        addr: "10.0.0.2:7000".parse().expect("addr"),
        state: EndpointState::Ready,
        weight: None,
    };
    devgate_lb_sync::render::render(&DesiredSet::from_endpoints(&[gateway]), &settings)
}

/// Puts the device TLS files where container `in_container` of `deploy` (nginx, or with
/// passthrough the gateway) mounts them (moved under `root`), as the volume's items name them:
/// the chart's own generated Secret, or test fixtures standing in for an existing Secret
/// (`tls.crt`/`tls.key`: the test server certificate; `ca.crt`: the test CA).
fn place_device_tls(docs: &[Value], root: &Path, deploy: &Value, in_container: &str) {
    let volumes = deploy["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    let mounts = container(deploy, in_container)["volumeMounts"]
        .as_array()
        .expect("mounts");
    for volume in ["device-tls", "device-client-ca"] {
        let Some(v) = volumes.iter().find(|v| v["name"] == volume) else {
            continue;
        };
        let dir = mounts
            .iter()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("{in_container} does not mount {volume}"));
        let dir = format!("{}{dir}", root.display());
        std::fs::create_dir_all(&dir).expect("mkdir");
        let secret = v["secret"]["secretName"].as_str().expect("secretName");
        let rendered = kind(docs, "Secret")
            .into_iter()
            .find(|s| s["metadata"]["name"] == secret);
        for item in v["secret"]["items"].as_array().expect("items") {
            let key = item["key"].as_str().expect("key");
            let bytes = match rendered {
                Some(s) => base64_decode(s["data"][key].as_str().expect("generated key")),
                None => {
                    let fixture = match key {
                        "tls.crt" => "server.pem",
                        "tls.key" => "server.key",
                        "ca.crt" => "ca.pem",
                        other => panic!("unexpected key {other}"),
                    };
                    std::fs::read(devgate_tests::nats::tls_fixture(fixture)).expect("fixture")
                }
            };
            let path = item["path"].as_str().expect("path");
            std::fs::write(format!("{dir}/{path}"), bytes).expect("write TLS file");
        }
    }
}

#[test]
fn the_ingress_controllers_lb_sync_starts_with_the_charts_settings() {
    for name in [
        "ingress-controller-values",
        "ingress-controller-other-namespace-values",
    ] {
        let docs = render(&combo(name), &[]);
        let deploy = one(&docs, "Deployment", &full("lb-sync"));
        let root = tempfile::tempdir().expect("tempdir");
        let config = lb_sync_config(container(deploy, "lb-sync"), root.path());
        assert_eq!(config.sink, devgate_lb_sync::config::SinkKind::Configmap);
        assert!(
            config.insecure_plaintext && config.render_settings().tls.is_none(),
            "{name}: the controller's listener is plaintext, asked for"
        );
    }
}

#[test]
fn the_rendered_nginx_config_passes_nginx_t_through_lb_syncs_own_command() {
    let module = format!("nginx.loadModules={{{DEBIAN_STREAM_MODULE}}}");
    for (name, tls) in [
        ("default", "generate"),
        ("hostnetwork-values", "generate"),
        ("device-tls-secret-values", "secret"),
        ("device-plaintext-values", "plaintext"),
        ("device-tls-passthrough-values", "passthrough"),
    ] {
        // One combination also raises the upstream zone's floor.
        let zone = if name == "hostnetwork-values" {
            "256k"
        } else {
            "64k"
        };
        let zone_set = format!("lbSync.upstreamZoneMinSize={zone}");
        let docs = render(&combo(name), &[&module, &zone_set]);
        let nginx = full("nginx");
        let conf = one(&docs, "ConfigMap", &nginx)["data"]["nginx.conf"]
            .as_str()
            .expect("nginx.conf")
            .to_owned();
        let deploy = one(&docs, "Deployment", &nginx);
        let lb = container(deploy, "lb-sync");
        let validate = env_value(lb, "DEVGATE_VALIDATE_CMD");
        let reload = env_value(lb, "DEVGATE_RELOAD_CMD");
        let output = env_value(lb, "DEVGATE_OUTPUT");

        // Both containers mount the config, the upstream directory and the pid directory
        // (lb-sync also its API token, checked in `lb_sync_rbac_is_exactly_what_its_code_calls`).
        let mounts = |c: &Value| -> BTreeSet<String> {
            c["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .filter(|m| m["name"] != "kube-api-access")
                .map(|m| {
                    format!(
                        "{}={}",
                        m["name"].as_str().expect("n"),
                        m["mountPath"].as_str().expect("p")
                    )
                })
                .collect()
        };
        let nginx_c = container(deploy, "nginx");
        assert_eq!(
            mounts(nginx_c),
            mounts(lb),
            "nginx and lb-sync must share their mounts"
        );
        assert_eq!(
            deploy["spec"]["template"]["spec"]["shareProcessNamespace"],
            true
        );
        let conf_path = nginx_c["command"]
            .as_array()
            .expect("command")
            .windows(2)
            .find(|w| w[0] == "-c")
            .map(|w| w[1].as_str().expect("path").to_owned())
            .expect("nginx -c");
        for cmd in [&validate, &reload] {
            assert!(
                cmd.contains(&format!("-c {conf_path}")),
                "{cmd} must use {conf_path}"
            );
        }
        let pid = conf
            .lines()
            .find_map(|l| l.trim().strip_prefix("pid "))
            .expect("pid directive")
            .trim_end_matches(';');
        assert!(
            mounts(lb)
                .iter()
                .any(|m| pid.starts_with(m.split('=').nth(1).expect("path"))),
            "the pid file {pid} must be on a volume lb-sync sees"
        );
        let include_dir = conf
            .lines()
            .find_map(|l| l.trim().strip_prefix("include "))
            .expect("include")
            .trim_end_matches("/*.conf;");
        assert!(
            output.starts_with(include_dir) && output.ends_with(".conf"),
            "{output} not included by {include_dir}"
        );

        let root = tempfile::tempdir().expect("tempdir");
        for d in [
            "/etc/devgate-nginx",
            "/var/lib/devgate-nginx/stream.d",
            "/var/run/devgate-nginx",
        ] {
            std::fs::create_dir_all(format!("{}{d}", root.path().display())).expect("mkdir");
        }
        std::fs::write(
            relocate(&conf_path, root.path()),
            relocate(&conf, root.path()),
        )
        .expect("write nginx.conf");
        // Before lb-sync's first write (nginx starts with nothing to include)...
        let out = run_pod_command(&validate, root.path());
        assert!(
            out.status.success(),
            "nginx -t without upstream ({name}):\n{}",
            text(&out)
        );
        // ...and with what lb-sync renders from the pod's own settings.
        place_device_tls(&docs, root.path(), deploy, "nginx");
        let upstream = lb_sync_render(lb, root.path());
        assert!(upstream.contains("proxy_protocol on;"), "{upstream}");
        assert!(
            upstream.contains(&format!(" {zone};")),
            "{name}: zone floor {zone} not rendered:\n{upstream}"
        );
        match tls {
            "plaintext" => assert!(!upstream.contains("ssl"), "{name}: {upstream}"),
            // A plain listener; only lb-sync's comment says why there is no ssl.
            "passthrough" => assert!(
                upstream.contains("passes through to the gateways")
                    && upstream
                        .lines()
                        .all(|l| l.trim().starts_with('#') || !l.contains("ssl")),
                "{name}: {upstream}"
            ),
            "secret" => {
                assert!(upstream.contains("ssl_verify_client on;"), "{upstream}");
                assert!(upstream.contains("ssl_verify_depth 3;"), "{upstream}");
                assert!(upstream.contains("ssl_protocols TLSv1.3;"), "{upstream}");
            }
            _ => assert!(
                upstream.contains(" ssl;") && !upstream.contains("ssl_verify_client"),
                "{name}: {upstream}"
            ),
        }
        std::fs::write(relocate(&output, root.path()), &upstream).expect("write upstream");
        let out = run_pod_command(&validate, root.path());
        assert!(
            out.status.success(),
            "nginx -t with upstream ({name}):\n{}",
            text(&out)
        );
        // The check is not vacuous: a broken upstream fails it.
        std::fs::write(relocate(&output, root.path()), "upstream broken {\n").expect("write");
        let out = run_pod_command(&validate, root.path());
        assert!(!out.status.success(), "nginx -t accepted a broken upstream");
    }
}

/// A container's port number by name.
fn container_port(c: &Value, name: &str) -> u64 {
    c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container {} has no port {name}", c["name"]))
}

/// The port a probe's `tcpSocket` targets, resolved to a number through the container's ports.
fn probe_port(c: &Value, probe: &str) -> u64 {
    let port = &c[probe]["tcpSocket"]["port"];
    port.as_u64().unwrap_or_else(|| {
        container_port(
            c,
            port.as_str().unwrap_or_else(|| panic!("{probe}: {port}")),
        )
    })
}

/// nginx listens on the device port only once lb-sync applied its first upstream, which may be
/// late (API unreachable, RBAC, TLS files): liveness on that port would have the kubelet restart
/// a healthy nginx, with a growing back-off, until then. Liveness checks nginx.conf's own
/// listener; readiness still gates traffic on the device port.
#[test]
fn nginx_liveness_checks_its_own_listener_and_readiness_the_device_port() {
    for (name, sets, health) in [
        ("default", vec![], 7001),
        ("hostnetwork-values", vec![], 7001),
        ("default", vec!["nginx.healthPort=7101"], 7101),
    ] {
        let docs = render(&combo(name), &sets);
        let nginx = full("nginx");
        let conf = one(&docs, "ConfigMap", &nginx)["data"]["nginx.conf"]
            .as_str()
            .expect("nginx.conf");
        let deploy = one(&docs, "Deployment", &nginx);
        let c = container(deploy, "nginx");
        assert_eq!(c["livenessProbe"]["tcpSocket"]["port"], "health", "{name}");
        assert_eq!(probe_port(c, "livenessProbe"), health, "{name} {sets:?}");
        assert_eq!(c["readinessProbe"]["tcpSocket"]["port"], "device", "{name}");
        let device = probe_port(c, "readinessProbe");
        assert_eq!(device, 7000, "{name}");
        // The health listener is nginx.conf's own, not lb-sync's (which renders the device one).
        assert!(
            conf.contains(&format!("listen {health};")) && conf.contains("return \"ok\\n\";"),
            "{name}: no health listener on {health} in nginx.conf:\n{conf}"
        );
        let lb_listen = env_value(container(deploy, "lb-sync"), "DEVGATE_LISTEN");
        assert!(lb_listen.ends_with(&format!(":{device}")), "{lb_listen}");
        // Not for devices: the Service exposes the device port only.
        let ports = one(&docs, "Service", &nginx)["spec"]["ports"]
            .as_array()
            .expect("ports");
        assert_eq!(ports.len(), 1, "{name}: {ports:?}");
        assert_eq!(ports[0]["targetPort"], "device");
        assert_eq!(ports[0]["port"], 7000);
    }
}

/// The nginx container's process, stopped (with its workers: its own process group) on drop.
struct PodNginx {
    child: std::process::Child,
    log: PathBuf,
}

impl PodNginx {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PodNginx {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        for signal in ["-TERM", "-KILL"] {
            let _ = Command::new("kill")
                .args([signal, "--", &group])
                .stderr(std::process::Stdio::null())
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// What a TCP connection to 127.0.0.1:`port` reads until the server closes it; `None` if the
/// connection is refused.
fn tcp_read(port: u16) -> Option<String> {
    use std::io::Read as _;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .expect("read timeout");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    Some(answer)
}

/// Polls `f` for up to 10 s.
fn wait_for(what: &str, nginx: &mut PodNginx, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        if let Ok(Some(status)) = nginx.child.try_wait() {
            panic!(
                "nginx exited with {status} waiting for {what}:\n{}",
                nginx.log()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            nginx.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The real nginx, run as the chart's nginx container runs it (its command, nginx.conf and
/// mounts, moved under a test directory), answers its liveness port before lb-sync wrote any
/// upstream, while the device port stays closed (the pod unready); and after lb-sync's first
/// apply (its render and reload command) both answer.
#[test]
fn nginx_answers_its_liveness_port_before_lb_syncs_first_apply() {
    let health = devgate_tests::nginx::free_port();
    let device = devgate_tests::nginx::free_port();
    let sets = [
        format!("nginx.loadModules={{{DEBIAN_STREAM_MODULE}}}"),
        format!("nginx.healthPort={health}"),
        format!("nginx.port={device}"),
        "nginx.workerProcesses=1".to_owned(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let docs = render(&combo("default"), &sets);
    let nginx_name = full("nginx");
    let conf = one(&docs, "ConfigMap", &nginx_name)["data"]["nginx.conf"]
        .as_str()
        .expect("nginx.conf");
    let deploy = one(&docs, "Deployment", &nginx_name);
    let c = container(deploy, "nginx");
    assert_eq!(probe_port(c, "livenessProbe"), u64::from(health));
    assert_eq!(probe_port(c, "readinessProbe"), u64::from(device));
    let lb = container(deploy, "lb-sync");

    let root = tempfile::tempdir().expect("tempdir");
    for m in c["volumeMounts"].as_array().expect("mounts") {
        let dir = relocate(m["mountPath"].as_str().expect("mountPath"), root.path());
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    let argv: Vec<String> = c["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|a| relocate(a.as_str().expect("arg"), root.path()))
        .collect();
    let conf_path = argv
        .windows(2)
        .find(|w| w[0] == "-c")
        .map(|w| w[1].clone())
        .expect("nginx -c");
    std::fs::write(&conf_path, relocate(conf, root.path())).expect("write nginx.conf");
    place_device_tls(&docs, root.path(), deploy, "nginx");

    let (program, args) = argv.split_first().expect("command");
    assert_eq!(program, "nginx");
    let log = root.path().join("nginx.stderr");
    let mut nginx = PodNginx {
        child: {
            use std::os::unix::process::CommandExt as _;
            Command::new(tool("nginx", "NGINX_BIN"))
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .process_group(0)
                .spawn()
                .expect("spawn nginx")
        },
        log,
    };

    // Before lb-sync's first apply: alive (liveness passes), not ready (device port closed).
    wait_for("the liveness port", &mut nginx, || {
        tcp_read(health).as_deref() == Some("ok\n")
    });
    assert_eq!(tcp_read(device), None, "nothing may listen for devices yet");

    // lb-sync's first apply: its render from the pod's settings, then its reload command.
    let output = env_value(lb, "DEVGATE_OUTPUT");
    std::fs::write(
        relocate(&output, root.path()),
        lb_sync_render(lb, root.path()),
    )
    .expect("write upstream");
    let out = run_pod_command(&env_value(lb, "DEVGATE_RELOAD_CMD"), root.path());
    assert!(out.status.success(), "reload:\n{}", text(&out));
    wait_for("the device port", &mut nginx, || tcp_read(device).is_some());
    assert_eq!(tcp_read(health).as_deref(), Some("ok\n"));
}

/// What lb-sync's code calls on the Kubernetes API, as RBAC rules. This table must change
/// whenever lb-sync's Kubernetes calls change:
///   lb-sync/src/source/kube.rs    kube-runtime `watcher` on EndpointSlices: list, then watch
///   lb-sync/src/sink/configmap.rs `Api::patch` with `Patch::Apply` (server-side apply) of the
///                                 one ConfigMap it is told to write
fn expected_rules(configmap: Option<&str>) -> Value {
    let mut rules = vec![json!({
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "verbs": ["list", "watch"],
    })];
    if let Some(name) = configmap {
        rules.push(json!({
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [name],
            "verbs": ["patch"],
        }));
    }
    Value::Array(rules)
}

#[test]
fn lb_sync_rbac_is_exactly_what_its_code_calls() {
    // Tripwire: the Kubernetes object types lb-sync's code uses. A new one means new calls,
    // and the table above must be revisited.
    let mut types = BTreeSet::new();
    for file in ["source/kube.rs", "sink/configmap.rs", "lib.rs"] {
        let src = std::fs::read_to_string(workspace_root().join("lb-sync/src").join(file))
            .expect("lb-sync source");
        for part in src.split("Api<").skip(1) {
            types.insert(part.split('>').next().expect("type").trim().to_owned());
        }
        assert!(
            !src.contains("Api::all"),
            "{file}: cluster-wide calls need a ClusterRole"
        );
    }
    assert_eq!(
        types,
        BTreeSet::from(["ConfigMap".to_owned(), "EndpointSlice".to_owned()]),
        "lb-sync uses new Kubernetes types: update expected_rules and the chart's Role"
    );

    for (name, configmap, configmap_namespace) in [
        ("default", None, NAMESPACE),
        ("hostnetwork-values", None, NAMESPACE),
        ("ingress-controller-values", Some("nginx-config"), NAMESPACE),
        (
            "ingress-controller-other-namespace-values",
            Some("nginx-config"),
            "ingress-nginx",
        ),
    ] {
        let docs = render(&combo(name), &[]);
        assert!(
            kind(&docs, "ClusterRole").is_empty() && kind(&docs, "ClusterRoleBinding").is_empty()
        );
        let sa = full("lb-sync");
        let role = one(&docs, "Role", &sa);
        let binding = one(&docs, "RoleBinding", &sa);
        assert_eq!(binding["roleRef"]["name"], sa);
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}])
        );
        let elsewhere = format!("{sa}-configmap");
        if configmap_namespace == NAMESPACE {
            assert_eq!(
                role["rules"],
                expected_rules(configmap),
                "Role rules ({name})"
            );
            assert!(
                kind(&docs, "Role")
                    .iter()
                    .all(|r| r["metadata"]["name"] != elsewhere.as_str()),
                "no Role outside the release namespace ({name})"
            );
        } else {
            // Endpoint slices are read at home; the ConfigMap is patched in the controller's
            // namespace, by a Role that exists there and allows nothing else.
            assert_eq!(role["rules"], expected_rules(None), "home Role ({name})");
            let full_rules = expected_rules(configmap);
            let cm_role = one(&docs, "Role", &elsewhere);
            assert_eq!(cm_role["metadata"]["namespace"], configmap_namespace);
            assert_eq!(cm_role["rules"], json!([full_rules[1]]), "{name}");
            let cm_binding = one(&docs, "RoleBinding", &elsewhere);
            assert_eq!(cm_binding["metadata"]["namespace"], configmap_namespace);
            assert_eq!(cm_binding["roleRef"]["name"], elsewhere.as_str());
            assert_eq!(
                cm_binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}])
            );
        }
        // Only lb-sync's pod runs with that account; every other pod has no API token.
        for (workload, spec) in pod_specs(&docs) {
            let has_lb_sync = spec["containers"]
                .as_array()
                .expect("containers")
                .iter()
                .any(|c| c["name"] == "lb-sync");
            if has_lb_sync {
                assert_eq!(spec["serviceAccountName"], sa.as_str());
                check_api_token_only_in_lb_sync(workload, spec);
                let lb = container(workload, "lb-sync");
                assert_eq!(env_value(lb, "DEVGATE_KUBE_NAMESPACE"), NAMESPACE);
                if let Some(cm) = configmap {
                    assert_eq!(env_value(lb, "DEVGATE_CONFIGMAP_NAME"), cm);
                    assert_eq!(
                        env_value(lb, "DEVGATE_CONFIGMAP_NAMESPACE"),
                        configmap_namespace
                    );
                    assert_eq!(env_value(lb, "DEVGATE_SINK"), "configmap");
                } else {
                    assert_eq!(env_value(lb, "DEVGATE_SINK"), "file");
                }
            } else {
                assert_eq!(
                    spec["automountServiceAccountToken"], false,
                    "{} must not mount an API token",
                    workload["metadata"]["name"]
                );
            }
        }
    }
}

/// In a pod lb-sync shares (with nginx, which faces the devices), the API token is mounted
/// into lb-sync alone: no automount, and the projected token only in lb-sync's mounts.
fn check_api_token_only_in_lb_sync(workload: &Value, spec: &Value) {
    const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
    let containers = spec["containers"].as_array().expect("containers");
    if containers.len() == 1 {
        return;
    }
    let name = &workload["metadata"]["name"];
    assert_eq!(
        spec["automountServiceAccountToken"], false,
        "{name}: the token is mounted per container, not into every one"
    );
    let token_volumes: Vec<&str> = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter(|v| {
            v["projected"]["sources"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s.get("serviceAccountToken").is_some()))
        })
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(token_volumes.len(), 1, "{name}: one token volume");
    for c in containers {
        let mounts: Vec<&Value> = c["volumeMounts"]
            .as_array()
            .map(|m| m.iter().collect())
            .unwrap_or_default();
        let token_mounts: Vec<&Value> = mounts
            .iter()
            .copied()
            .filter(|m| m["name"] == token_volumes[0])
            .collect();
        if c["name"] == "lb-sync" {
            assert_eq!(token_mounts.len(), 1, "{name}: lb-sync mounts the token");
            assert_eq!(
                token_mounts[0]["mountPath"], TOKEN_DIR,
                "where kube-rs reads it"
            );
            assert_eq!(token_mounts[0]["readOnly"], true);
        } else {
            assert!(
                token_mounts.is_empty() && mounts.iter().all(|m| m["mountPath"] != TOKEN_DIR),
                "{name}: container {} must not see the API token",
                c["name"]
            );
        }
    }
}

#[test]
fn gateways_drain_within_their_grace_period_behind_the_load_balancer() {
    for (name, sets) in [
        ("default", vec![]),
        ("autoscaling-monitoring-values", vec![]),
        (
            "external-nats-noauth-values",
            vec!["gateway.preStopSleepSeconds=9"],
        ),
    ] {
        let docs = render(&combo(name), &sets);
        if let Some(bridge) = kind(&docs, "Deployment")
            .into_iter()
            .find(|d| d["metadata"]["name"] == full("bridge-api"))
        {
            // bridge-api drains for its request cap plus 5 s, so a request waiting for a
            // device's ACK at SIGTERM still gets its answer before the kubelet kills it.
            let cap_ms: u64 = env_value(
                container(bridge, "bridge-api"),
                "DEVGATE_REQUEST_TIMEOUT_MS",
            )
            .parse()
            .expect("ms");
            let grace = bridge["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .expect("bridge-api grace");
            assert!(
                grace > cap_ms.div_ceil(1000) + 5,
                "{name}: bridge-api terminationGracePeriodSeconds {grace} <= request cap {cap_ms} ms + 5 s"
            );
        }
        let gw_name = full("gateway");
        let deploy = one(&docs, "Deployment", &gw_name);
        let spec = &deploy["spec"]["template"]["spec"];
        let gw = container(deploy, "gateway");
        let drain_ms: u64 = env_value(gw, "DEVGATE_DRAIN_WINDOW_MS")
            .parse()
            .expect("ms");
        let pre_stop: u64 = gw["lifecycle"]["preStop"]["exec"]["command"][1]
            .as_str()
            .expect("sleep seconds")
            .parse()
            .expect("number");
        let grace = spec["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace");
        // preStop sleep, then the drain window, then the gateway's own 5 s grace.
        assert!(
            grace > pre_stop + drain_ms.div_ceil(1000) + 5,
            "{name}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain {drain_ms} ms + 5 s"
        );
        assert_eq!(gw["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(gw["readinessProbe"]["httpGet"]["port"], "http");
        let http_port = gw["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == "http")
            .expect("http port")["containerPort"]
            .as_u64()
            .expect("port");
        assert!(env_value(gw, "DEVGATE_HTTP_LISTEN").ends_with(&format!(":{http_port}")));
        let env = &gw["env"];
        assert!(
            env.as_array()
                .expect("env")
                .iter()
                .any(|e| e["name"] == "POD_IP"
                    && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"),
            "advertise address comes from POD_IP"
        );
        // The gateway Service is headless, with the port lb-sync looks for.
        let svc = one(&docs, "Service", &gw_name);
        assert_eq!(svc["spec"]["clusterIP"], "None");
        let lb = docs
            .iter()
            .filter(|d| d["kind"] == "Deployment")
            .flat_map(|d| {
                d["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .expect("c")
            })
            .find(|c| c["name"] == "lb-sync")
            .expect("an lb-sync container");
        assert_eq!(env_value(lb, "DEVGATE_KUBE_SERVICE"), gw_name);
        let port_name = env_value(lb, "DEVGATE_KUBE_PORT_NAME");
        assert!(
            svc["spec"]["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .any(|p| p["name"] == port_name.as_str())
        );
        // nginx sends the PROXY protocol exactly when the gateways expect it.
        assert_eq!(
            env_value(lb, "DEVGATE_PROXY_PROTOCOL"),
            env_value(gw, "DEVGATE_PROXY_PROTOCOL"),
            "{name}"
        );
        let autoscaled = !kind(&docs, "HorizontalPodAutoscaler").is_empty();
        assert_eq!(
            deploy["spec"]["replicas"].is_null(),
            autoscaled,
            "HPA owns replicas"
        );
    }
}

#[test]
fn secrets_stay_in_the_secret() {
    let values = [
        "fleet-secret-from-values-0123456789",
        "api-token-one-0123456789",
        "api-token-two-0123456789",
        "nats-gateway-pass-from-values",
        "nats-bridge-pass-from-values",
        "nats-service-pass-from-values",
        "natsRoutePassFromValues",
    ];
    let docs = render(&combo("autoscaling-monitoring-values"), &[]);
    let data = secret_data(&docs);
    assert_eq!(data["device-auth-secret"], values[0]);
    assert_eq!(data["api-tokens"], format!("{},{}", values[1], values[2]));
    for d in &docs {
        if d["kind"] == "Secret" {
            continue;
        }
        let s = d.to_string();
        for v in values {
            assert!(
                !s.contains(v),
                "{} {} contains a secret",
                d["kind"],
                d["metadata"]["name"]
            );
        }
    }
    // Generated values: long enough for the components' checks, and every reference resolves.
    for c in combos() {
        let docs = render(&c, &[]);
        let existing = c.name == "external-nats-values";
        let (secret_name, keys): (String, BTreeSet<String>) = if existing {
            assert!(
                kind(&docs, "Secret")
                    .iter()
                    .all(|s| s["metadata"]["name"] != RELEASE),
                "existingSecret: the chart renders no Secret of its own"
            );
            (
                "devgate-secrets".into(),
                [
                    "device-auth-secret",
                    "api-tokens",
                    "nats-gateway-password",
                    "nats-bridge-api-password",
                ]
                .map(str::to_owned)
                .into(),
            )
        } else {
            let data = secret_data(&docs);
            for (k, v) in &data {
                assert!(v.len() >= 16, "{k} is too short");
            }
            (RELEASE.into(), data.keys().cloned().collect())
        };
        for (workload, spec) in pod_specs(&docs) {
            for container in spec["containers"].as_array().expect("containers") {
                for e in container["env"].as_array().into_iter().flatten() {
                    let r = &e["valueFrom"]["secretKeyRef"];
                    if r.is_null() {
                        continue;
                    }
                    assert_eq!(
                        r["name"],
                        secret_name.as_str(),
                        "{}",
                        workload["metadata"]["name"]
                    );
                    let key = r["key"].as_str().expect("key");
                    // An optional key (the previous fleet secret, only during a rotation) may
                    // be absent: the kubelet then sets no variable.
                    assert!(
                        keys.contains(key) || r["optional"] == true,
                        "{}: Secret key {key} missing",
                        c.name
                    );
                }
            }
        }
    }
}

#[test]
fn tls_to_nats_mounts_the_secret_into_every_nats_client_and_nothing_else() {
    let mount =
        json!([{"name": "nats-tls", "mountPath": "/etc/devgate/nats-tls", "readOnly": true}]);
    let external = json!([{"name": "nats-tls", "secret": {"secretName": "devgate-nats-client-tls", "defaultMode": 0o440}}]);
    // The in-cluster NATS's Secret also holds the server's key: clients get its ca.crt only.
    let in_cluster = json!([{"name": "nats-tls", "secret": {
        "secretName": "devgate-nats-tls",
        "defaultMode": 0o440,
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }}]);
    for (name, sets, client_cert, volumes) in [
        ("external-nats-tls-values", vec![], true, &external),
        (
            "external-nats-tls-values",
            vec!["nats.external.tls.clientCertificate=false"],
            false,
            &external,
        ),
        ("nats-tls-values", vec![], false, &in_cluster),
    ] {
        let docs = render(&combo(name), &sets);
        let mut clients = 0;
        for (workload, spec) in pod_specs(&docs) {
            for c in spec["containers"].as_array().expect("containers") {
                let env = env_values(c);
                let is_nats_client = env.contains_key("DEVGATE_NATS_URL");
                let who = format!("{} / {}", workload["metadata"]["name"], c["name"]);
                if !is_nats_client {
                    assert!(
                        c["volumeMounts"]
                            .as_array()
                            .is_none_or(|m| m.iter().all(|m| m["name"] != "nats-tls")),
                        "{who} must not see the NATS TLS files"
                    );
                    continue;
                }
                clients += 1;
                assert!(env["DEVGATE_NATS_URL"].starts_with("tls://"), "{who}");
                assert_eq!(
                    env["DEVGATE_NATS_TLS_CA"], "/etc/devgate/nats-tls/ca.crt",
                    "{who}"
                );
                assert_eq!(
                    env.get("DEVGATE_NATS_TLS_CERT").map(String::as_str),
                    client_cert.then_some("/etc/devgate/nats-tls/tls.crt"),
                    "{who}"
                );
                assert_eq!(
                    env.get("DEVGATE_NATS_TLS_KEY").map(String::as_str),
                    client_cert.then_some("/etc/devgate/nats-tls/tls.key"),
                    "{who}"
                );
                // The gateways also mount their denylist; here only the NATS TLS files count.
                let nats_tls = |list: &Value| -> Value {
                    list.as_array()
                        .expect("a list")
                        .iter()
                        .filter(|v| v["name"] != "denied-devices")
                        .cloned()
                        .collect()
                };
                assert_eq!(nats_tls(&c["volumeMounts"]), mount, "{who}");
                assert_eq!(&nats_tls(&spec["volumes"]), volumes, "{who}");
            }
        }
        assert_eq!(clients, 2, "the gateways and bridge-api");
    }
    // Without TLS nothing is mounted, no TLS env is set, and the URL is plain.
    for name in ["external-nats-values", "default"] {
        let docs = render(&combo(name), &[]);
        for (_, spec) in pod_specs(&docs) {
            for c in spec["containers"].as_array().expect("containers") {
                let env = env_values(c);
                assert!(!env.contains_key("DEVGATE_NATS_TLS_CA"), "{name}");
                assert!(
                    env.get("DEVGATE_NATS_URL")
                        .is_none_or(|u| u.starts_with("nats://")),
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn bad_values_fail_with_a_clear_message() {
    let default = combo("default");
    for (sets, needle) in [
        (vec!["loadBalancer.mode=haproxy"], "loadBalancer.mode"),
        (
            vec!["loadBalancer.mode=ingressController"],
            "ingressController.configMapName",
        ),
        (vec!["nats.enabled=false"], "nats.url is required"),
        (vec!["nats.url=nats://x:4222"], "set nats.enabled=false"),
        (vec!["nats.replicas=2"], "odd number"),
        (
            vec!["nats.external.tls.existingSecret=nats-tls"],
            "nats.external.tls is for an existing NATS",
        ),
        (
            vec![
                "nats.enabled=false",
                "nats.url=tls://nats:4222",
                "nats.tls.existingSecret=nats-tls",
            ],
            "nats.tls is for the in-cluster NATS",
        ),
        (
            vec!["secrets.deviceAuthSecret=short"],
            "at least 16 characters",
        ),
        (
            vec!["secrets.apiTokens={tooshort}"],
            "at least 16 characters",
        ),
        // bridge-api refuses a token with surrounding whitespace (it could never match).
        (
            vec!["secrets.apiTokens={ 0123456789abcdef}"],
            "must not begin or end with whitespace",
        ),
        (
            vec!["secrets.apiTokens={0123456789abcdef,fedcba9876543210\n}"],
            "must not begin or end with whitespace",
        ),
        (
            vec!["secrets.apiTokens={\t0123456789abcdef}"],
            "must not begin or end with whitespace",
        ),
        (
            vec!["secrets.nats.routePassword=p@ss/word-0123456789"],
            "URL-safe",
        ),
        // The in-cluster nats-server reads passwords as configuration values.
        (
            vec!["secrets.nats.gatewayPassword=yes"],
            "secrets.nats.gatewayPassword must start with a letter",
        ),
        (
            vec!["secrets.nats.servicePassword=10k"],
            "secrets.nats.servicePassword must start with a letter",
        ),
        (
            vec!["secrets.nats.bridgeApiPassword=a b"],
            "secrets.nats.bridgeApiPassword must start with a letter",
        ),
        (
            vec!["secrets.nats.sysPassword=p@ss;word"],
            "secrets.nats.sysPassword must start with a letter",
        ),
        // Numbers reach the binaries as whole numbers, or not at all: int64 alone would turn
        // "10s" into 0, which disables draining.
        (
            vec!["gateway.drainWindowMs=10s"],
            "gateway.drainWindowMs must be a whole number of 0 or more, got 10s",
        ),
        (
            vec!["gateway.uplinkRate.msgs=-1"],
            "gateway.uplinkRate.msgs must be a whole number",
        ),
        (
            vec!["bridgeApi.maxTails=1.5"],
            "bridgeApi.maxTails must be a whole number",
        ),
        (
            vec!["secrets.deviceAuthSecretPrevious=12345678901234567"],
            "secrets.deviceAuthSecretPrevious must be a string",
        ),
        (vec!["networkPolicy=null"], "--reset-then-reuse-values"),
        // --reuse-values from a chart before the limits were values.
        (vec!["gateway.uplinkRate=null"], "--reset-then-reuse-values"),
        // A setting the chart makes is not set twice.
        (
            vec![
                "gateway.extraEnv[0].name=DEVGATE_ACK_TIMEOUT_MS",
                "gateway.extraEnv[0].value=60000",
            ],
            "gateway.extraEnv sets DEVGATE_ACK_TIMEOUT_MS",
        ),
        (
            vec![
                "bridgeApi.extraEnv[0].name=DEVGATE_MAX_TAILS",
                "bridgeApi.extraEnv[0].value=8",
            ],
            "bridgeApi.extraEnv sets DEVGATE_MAX_TAILS",
        ),
        // hostNetwork nginx dials the gateways from node addresses: a policy must name them.
        (
            vec!["nginx.hostNetwork=true"],
            "set networkPolicy.gateway.deviceFrom",
        ),
        (vec!["nginx.healthPort=7000"], "must differ from nginx.port"),
        (vec!["nginx.healthPort=9092"], "must differ from nginx.port"),
        (vec!["gateway.heartbeatS=60"], "proxyTimeoutS"),
        (
            vec!["nginx.tls.mode=off"],
            "choose generate, secret, passthrough or plaintext",
        ),
        (vec!["nginx.tls=null"], "--reset-then-reuse-values"),
        (vec!["nginx.tls.ca.cert=x"], "go together"),
        (vec!["nginx.tls.keyAlgorithm=dsa"], "choose ecdsa or rsa"),
        (
            vec![
                "nginx.tls.mode=plaintext",
                "nginx.tls.ca.cert=x",
                "nginx.tls.ca.key=y",
            ],
            "with nginx.tls.mode=generate only",
        ),
        (
            vec!["nginx.tls.mode=secret"],
            "needs nginx.tls.existingSecret",
        ),
        (
            vec!["nginx.tls.existingSecret=device-tls"],
            "with nginx.tls.mode=secret or passthrough only",
        ),
        (
            vec!["nginx.tls.mode=plaintext", "nginx.tls.clientCaSecret=ca"],
            "clientCaSecret (device certificates) needs TLS",
        ),
        (
            vec![
                "loadBalancer.mode=ingressController",
                "ingressController.configMapName=nginx-config",
            ],
            "set nginx.tls.mode=passthrough for TLS at the gateways (the controller forwards it), or set nginx.tls.mode=plaintext to acknowledge",
        ),
    ] {
        assert_refused(&default, &sets, needle);
    }
    // Whitespace inside a token is presented unchanged, so bridge-api accepts it: so does the
    // chart.
    let docs = render(&default, &["secrets.apiTokens={0123456789 abcdef}"]);
    assert_eq!(secret_data(&docs)["api-tokens"], "0123456789 abcdef");
    // Plain passwords pass; an existing NATS reads them as strings, so anything goes there.
    let docs = render(&default, &["secrets.nats.gatewayPassword=_Gw-pass_01"]);
    assert_eq!(secret_data(&docs)["nats-gateway-password"], "_Gw-pass_01");
    let external = combo("external-nats-values");
    let docs = render(
        &external,
        &[
            "secrets.existingSecret=",
            "secrets.nats.gatewayPassword=p@ss/word 1",
        ],
    );
    assert_eq!(secret_data(&docs)["nats-gateway-password"], "p@ss/word 1");
}

#[test]
fn notes_tell_how_to_connect_a_device_curl_the_bridge_and_use_the_nats_cli() {
    for (name, needles) in [
        (
            "default",
            vec![
                "nodePort",
                "openssl dgst",
                "curl",
                "nats --server",
                "device-auth-secret",
                "devgate-device-tls -o jsonpath='{.data.ca\\.crt}'",
                "--tls-ca device-ca.crt --tls-server-name devgate-nginx --devices 3",
                "carry the label(s) devgate.io/nats-client=true",
                "service-alt, key nats-service-alt-password",
            ],
        ),
        (
            "device-tls-secret-values",
            vec![
                "Secret devgate-device-tls",
                "mutual TLS",
                "--tls-cert device.crt --tls-key device.key",
            ],
        ),
        ("device-plaintext-values", vec!["WARNING", "PLAINTEXT"]),
        (
            "device-tls-passthrough-values",
            vec![
                "TLS ends at the gateways (nginx.tls.mode=passthrough): nginx passes the devices'",
                "Secret devgate-device-tls",
                "ca.crt of Secret devgate-device-client-ca that names",
                "their device id (as a DNS subjectAltName",
                "--tls-cert dev-1.crt --tls-key dev-1.key --devices 1",
            ],
        ),
        ("loadbalancer-values", vec!["loadBalancer.ingress", "curl"]),
        ("hostnetwork-values", vec!["<node IP>:7000"]),
        (
            "ingress-controller-values",
            vec![
                "stream-snippets",
                "nginx-config",
                // Monitors on, NetworkPolicies letting only the namespace scrape.
                "networkPolicy.monitoring.from is empty",
            ],
        ),
        (
            "external-nats-noauth-values",
            vec!["nats://nats-a.messaging.svc:4222"],
        ),
        (
            "nats-tls-values",
            vec![
                "ca\\.crt",
                "nats --server tls://localhost:4222 --tlsca nats-ca.crt --user service",
            ],
        ),
    ] {
        let notes = notes(name);
        for n in needles {
            assert!(notes.contains(n), "{name}: NOTES lack {n:?}:\n{notes}");
        }
    }
    // Prometheus' namespace is allowed there: no warning.
    let notes = notes("autoscaling-monitoring-values");
    assert!(!notes.contains("cannot scrape"), "{notes}");
}

/// The NOTES `helm install` prints for a combination.
fn notes(name: &str) -> String {
    notes_with(name, &[])
}

/// The NOTES for a combination with `sets` on top.
fn notes_with(name: &str, sets: &[&str]) -> String {
    let c = combo(name);
    let out = run(Command::new(helm_bin())
        .args(["install", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE, "--dry-run=client"])
        .args(values_args(&c, sets))
        .env("KUBECONFIG", "/nonexistent"));
    let all = text(&out);
    assert!(out.status.success(), "{name}: {all}");
    all.split("NOTES:")
        .nth(1)
        .unwrap_or_else(|| panic!("{name}: no NOTES"))
        .to_owned()
}

#[test]
fn the_generated_device_certificate_is_signed_by_the_kept_ca_for_the_names_devices_dial() {
    let names = [
        "nginx.tls.dnsNames={devices.example.com}",
        "nginx.tls.ipAddresses={203.0.113.7}",
    ];
    // A CA created by the chart (what `helm template` shows; an install keeps the first one),
    // ECDSA by default and RSA when asked...
    check_generated_device_certificate(&render(&combo("default"), &names), None, "EC");
    let rsa = [names[0], names[1], "nginx.tls.keyAlgorithm=rsa"];
    check_generated_device_certificate(&render(&combo("default"), &rsa), None, "RSA");
    // ...and one given in values, for renders without the cluster (GitOps).
    let expected_ca = std::fs::read(devgate_tests::nats::tls_fixture("ca.pem")).expect("fixture");
    let (_values, given) = ca_from_values();
    check_generated_device_certificate(&render(&given, &names), Some(&expected_ca), "EC");
}

/// Values giving the test fixtures' CA (ECDSA) in `nginx.tls.ca`, in a file that lives as long
/// as the returned directory.
fn ca_from_values() -> (tempfile::TempDir, Combo) {
    let indent = |name: &str| {
        std::fs::read_to_string(devgate_tests::nats::tls_fixture(name))
            .expect("fixture")
            .lines()
            .map(|l| format!("        {l}\n"))
            .collect::<String>()
    };
    values_file(
        "ca-from-values",
        &format!(
            "nginx:\n  tls:\n    ca:\n      cert: |\n{}      key: |\n{}",
            indent("ca.pem"),
            indent("ca.key")
        ),
    )
}

/// A values file holding `yaml`, as a combination named `name`; the file lives as long as the
/// returned directory.
fn values_file(name: &str, yaml: &str) -> (tempfile::TempDir, Combo) {
    let dir = tempfile::tempdir().expect("tempdir");
    let values = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&values, yaml).expect("write values");
    let combo = Combo {
        name: name.into(),
        file: Some(values),
    };
    (dir, combo)
}

/// The generated device Secrets: the CA kept (and, if given, the expected one), its key out of
/// the mounted Secret, the server key of `algorithm` ("EC", "RSA"), and the server certificate
/// valid under the CA for the Service's names and the extra ones only.
fn check_generated_device_certificate(docs: &[Value], expected_ca: Option<&[u8]>, algorithm: &str) {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    let ca_secret = one(docs, "Secret", &full("device-ca"));
    assert_eq!(
        ca_secret["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "devices trust the CA: an uninstall must not delete it"
    );
    let tls_secret = one(docs, "Secret", &full("device-tls"));
    assert_eq!(tls_secret["type"], "kubernetes.io/tls");
    assert!(
        tls_secret["data"].get("ca.key").is_none(),
        "the CA's key stays out of the mounted Secret"
    );
    let pem = |secret: &Value, key: &str| base64_decode(secret["data"][key].as_str().expect(key));
    assert_eq!(pem(tls_secret, "ca.crt"), pem(ca_secret, "ca.crt"));
    let key = String::from_utf8(pem(tls_secret, "tls.key")).expect("PEM key");
    assert!(
        key.starts_with(&format!("-----BEGIN {algorithm} PRIVATE KEY-----")),
        "{algorithm} key expected: {}",
        key.lines().next().unwrap_or_default()
    );
    if let Some(expected) = expected_ca {
        let der = |bytes: &[u8]| CertificateDer::from_pem_slice(bytes).expect("PEM").to_vec();
        assert_eq!(
            der(&pem(ca_secret, "ca.crt")),
            der(expected),
            "the CA given"
        );
    }

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&pem(ca_secret, "ca.crt")).expect("CA PEM"))
        .expect("CA");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .expect("verifier");
    let cert = CertificateDer::from_pem_slice(&pem(tls_secret, "tls.crt")).expect("cert PEM");
    let verify = |name: &str| {
        let name = ServerName::try_from(name.to_owned()).expect("name");
        verifier.verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
    };
    for name in [
        full("nginx"),
        format!("{}.{NAMESPACE}.svc", full("nginx")),
        "devices.example.com".to_owned(),
        "203.0.113.7".to_owned(),
    ] {
        verify(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(
        verify("elsewhere.example.com").is_err(),
        "a name not asked for"
    );
}

#[test]
fn the_packaged_chart_carries_the_nats_files() {
    // `files/nats` is a link to the repository's `nats/`; `helm package` must resolve it, or a
    // chart installed from a repository would ship empty NATS configuration.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(Command::new(helm_bin())
        .arg("package")
        .arg(chart())
        .arg("--destination")
        .arg(dir.path()));
    assert!(out.status.success(), "helm package: {}", text(&out));
    let package = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .expect("a .tgz");
    let out = run(Command::new(helm_bin())
        .args(["template", RELEASE])
        .arg(&package)
        .args(["--namespace", NAMESPACE]));
    assert!(
        out.status.success(),
        "helm template of the package: {}",
        text(&out)
    );
    let docs = parse(&String::from_utf8_lossy(&out.stdout));
    let cm = one(&docs, "ConfigMap", &full("nats"));
    for file in [
        "cluster.conf",
        "cluster-routes.conf",
        "cluster-tls.conf",
        "common.conf",
        "accounts.conf",
    ] {
        let original =
            std::fs::read_to_string(workspace_root().join("nats").join(file)).expect("nats file");
        assert_eq!(
            cm["data"][file],
            original.as_str(),
            "{file} in the packaged chart"
        );
    }
}

/// The chart's one `lookup` (the `devgate.existingSecret` helper), answered from a file instead
/// of an API server.
const LOOKUP: &str = r#"{{- lookup "v1" "Secret" $root.Release.Namespace (index . 1) | toYaml -}}"#;
const LOOKUP_FROM_FILE: &str = r#"{{- index ($root.Files.Get "test-cluster.json" | fromJson) (index . 1) | default dict | toYaml -}}"#;

/// A copy of the chart that renders as `helm upgrade` would against a cluster holding
/// `secrets` (by name): the same templates, with the lookup read from a file.
fn chart_against(secrets: &BTreeMap<String, Value>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("devgate");
    let out = run(Command::new("cp").arg("-rL").arg(chart()).arg(&copy));
    assert!(out.status.success(), "copying the chart: {}", text(&out));
    let helpers = copy.join("templates/_helpers.tpl");
    let source = std::fs::read_to_string(&helpers).expect("_helpers.tpl");
    assert!(
        source.contains(LOOKUP),
        "the chart's lookup changed; update LOOKUP"
    );
    std::fs::write(&helpers, source.replace(LOOKUP, LOOKUP_FROM_FILE)).expect("write helpers");
    std::fs::write(
        copy.join("test-cluster.json"),
        serde_json::to_vec(secrets).expect("json"),
    )
    .expect("write cluster");
    dir
}

fn render_against(secrets: &BTreeMap<String, Value>, sets: &[&str]) -> Result<Vec<Value>, String> {
    let dir = chart_against(secrets);
    try_template_of(&dir.path().join("devgate"), &combo("default"), sets).map(|y| parse(&y))
}

/// The Secrets of a render, by name, as the cluster holds them after it is applied.
fn secrets_of(docs: &[Value]) -> BTreeMap<String, Value> {
    kind(docs, "Secret")
        .into_iter()
        .map(|s| {
            let name = s["metadata"]["name"].as_str().expect("name").to_owned();
            (name, s.clone())
        })
        .collect()
}

#[test]
fn an_upgrade_keeps_the_device_ca_the_server_certificate_and_generated_secrets() {
    let installed = secrets_of(&render(&combo("default"), &[]));
    let (ca, tls) = (full("device-ca"), full("device-tls"));
    let upgraded = secrets_of(&render_against(&installed, &[]).expect("upgrade"));
    assert_eq!(
        upgraded[&ca]["data"], installed[&ca]["data"],
        "the CA is kept"
    );
    assert_eq!(
        upgraded[&tls], installed[&tls],
        "an unchanged server certificate is kept: a new one would reload nginx and, after its \
         worker shutdown timeout, cut every device connection"
    );
    assert_eq!(
        upgraded[RELEASE]["data"], installed[RELEASE]["data"],
        "generated secrets (device auth, API tokens, NATS passwords) are kept"
    );

    // New names for devices to dial: a new certificate, for them, from the same CA.
    let names = [
        "nginx.tls.dnsNames={devices.example.com}",
        "nginx.tls.ipAddresses={203.0.113.7}",
    ];
    let renamed = render_against(&installed, &names).expect("upgrade with new names");
    let ca_pem = base64_decode(installed[&ca]["data"]["ca.crt"].as_str().expect("ca.crt"));
    check_generated_device_certificate(&renamed, Some(&ca_pem), "EC");

    // Two thirds into its validity, the next upgrade with the same values renews it.
    let renamed = secrets_of(&renamed);
    let mut due = renamed.clone();
    if let Some(tls) = due.get_mut(&tls) {
        tls["metadata"]["annotations"]["devgate.io/renew-after"] = json!("1");
    }
    let renewed = render_against(&due, &names).expect("upgrade when due");
    check_generated_device_certificate(&renewed, Some(&ca_pem), "EC");
    let renewed = secrets_of(&renewed);
    assert_ne!(
        renewed[&tls]["data"]["tls.crt"],
        renamed[&tls]["data"]["tls.crt"]
    );
    assert_ne!(
        renewed[&tls]["metadata"]["annotations"]["devgate.io/renew-after"],
        json!("1")
    );
}

#[test]
fn an_upgrade_refuses_to_replace_or_misuse_the_kept_device_ca() {
    let installed = secrets_of(&render(&combo("default"), &[]));
    let ca = full("device-ca");

    // A CA Secret someone emptied (its key moved offline, say) is not silently replaced.
    let mut keyless = installed.clone();
    if let Some(data) = keyless.get_mut(&ca).and_then(|s| s["data"].as_object_mut()) {
        data.remove("ca.key");
    }
    let error = render_against(&keyless, &[]).expect_err("keyless CA");
    assert!(
        error.contains("exists but lacks ca.crt or ca.key"),
        "{error}"
    );

    // RSA asked for after install: the kept CA is ECDSA and signs the certificate, so RSA-only
    // devices would still fail; say so instead of issuing a certificate that cannot help them.
    let error = render_against(&installed, &["nginx.tls.keyAlgorithm=rsa"]).expect_err("rsa");
    assert!(error.contains("has an ecdsa key"), "{error}");
    // The same for a CA given in values (the fixture CA is ECDSA): refused at once, not only
    // at the first upgrade that reads it back.
    let (_values, given) = ca_from_values();
    let error = try_template(&given, &["nginx.tls.keyAlgorithm=rsa"])
        .expect_err("rsa with an ECDSA CA in values");
    assert!(error.contains("has an ecdsa key"), "{error}");
}

/// Whether a Kubernetes label selector (`matchLabels`, `matchExpressions`) selects `labels`.
/// An absent or empty selector selects everything.
fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let match_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == Some(v.as_str().expect("label value")));
    let match_expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().expect("key");
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v.as_str().expect("value"))
                .collect();
            let value = labels.get(key).map(String::as_str);
            match e["operator"].as_str().expect("operator") {
                "In" => value.is_some_and(|v| values.contains(&v)),
                "NotIn" => !value.is_some_and(|v| values.contains(&v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                op => panic!("unknown operator {op}"),
            }
        });
    match_labels && match_expressions
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().expect("label").to_owned()))
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Where a connection comes from: a pod (namespace, labels) or an address outside the pod
/// network (a node, a device).
#[derive(Debug, Clone)]
enum Source {
    Pod {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    Ip(std::net::Ipv4Addr),
}

fn pod_in(namespace: &str, pairs: &[(&str, &str)]) -> Source {
    Source::Pod {
        namespace: namespace.to_owned(),
        labels: labels(pairs),
    }
}

/// A pod of the release: the labels of a rendered workload's pod template.
fn chart_pod(docs: &[Value], kind_: &str, name: &str) -> Source {
    Source::Pod {
        namespace: NAMESPACE.to_owned(),
        labels: labels_of(&one(docs, kind_, name)["spec"]["template"]["metadata"]["labels"]),
    }
}

fn ip(s: &str) -> Source {
    Source::Ip(s.parse().expect("IPv4 address"))
}

fn in_cidr(addr: std::net::Ipv4Addr, cidr: &str) -> bool {
    let (net, bits) = cidr.split_once('/').expect("CIDR");
    let net: std::net::Ipv4Addr = net.parse().expect("IPv4 CIDR");
    let bits: u32 = bits.parse().expect("prefix length");
    let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
    u32::from(addr) & mask == u32::from(net) & mask
}

/// NetworkPolicyPeer semantics, for a policy in the release namespace: a podSelector alone
/// means that namespace's pods, a namespaceSelector selects namespaces by their labels (here
/// the automatic `kubernetes.io/metadata.name`), both together select pods in those
/// namespaces; an ipBlock matches addresses outside the pod network.
fn peer_matches(peer: &Value, source: &Source) -> bool {
    match source {
        Source::Ip(addr) => {
            peer["ipBlock"].is_object() && {
                let block = &peer["ipBlock"];
                in_cidr(*addr, block["cidr"].as_str().expect("cidr"))
                    && !block["except"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| in_cidr(*addr, e.as_str().expect("except")))
            }
        }
        Source::Pod { namespace, labels } => {
            if peer["ipBlock"].is_object() {
                // Pod addresses are for selectors (CNIs differ on ipBlock of pod IPs).
                return false;
            }
            let namespace_ok = if peer["namespaceSelector"].is_object() {
                selector_matches(
                    &peer["namespaceSelector"],
                    &self::labels(&[("kubernetes.io/metadata.name", namespace)]),
                )
            } else {
                namespace == NAMESPACE
            };
            namespace_ok && selector_matches(&peer["podSelector"], labels)
        }
    }
}

/// Whether `source` may open a TCP connection to the container port named `port` of the pods
/// of workload `kind_`/`name`, by the render's NetworkPolicies: allowed when no policy selects
/// the pods for ingress, else when a rule of one that does admits port and source.
fn ingress_allowed(docs: &[Value], kind_: &str, name: &str, port: &str, source: &Source) -> bool {
    let workload = one(docs, kind_, name);
    let pod_labels = labels_of(&workload["spec"]["template"]["metadata"]["labels"]);
    let container_port = workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("{name} has no port {port}"));
    let number = container_port["containerPort"].as_u64().expect("port");
    let protocol = container_port["protocol"].as_str().unwrap_or("TCP");
    let policies: Vec<&Value> = kind(docs, "NetworkPolicy")
        .into_iter()
        .filter(|p| selector_matches(&p["spec"]["podSelector"], &pod_labels))
        .filter(|p| {
            p["spec"]["policyTypes"]
                .as_array()
                .is_none_or(|t| t.iter().any(|t| t == "Ingress"))
        })
        .collect();
    if policies.is_empty() {
        return true;
    }
    policies.iter().any(|p| {
        p["spec"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                let ports_ok = rule["ports"].as_array().is_none_or(|ports| {
                    ports.is_empty()
                        || ports.iter().any(|rp| {
                            rp["protocol"].as_str().unwrap_or("TCP") == protocol
                                && match &rp["port"] {
                                    Value::Null => true,
                                    Value::String(n) => n == port,
                                    Value::Number(n) => {
                                        let start = n.as_u64().expect("port");
                                        let end = rp["endPort"].as_u64().unwrap_or(start);
                                        (start..=end).contains(&number)
                                    }
                                    other => panic!("bad port {other}"),
                                }
                        })
                });
                let from_ok = rule["from"].as_array().is_none_or(|from| {
                    from.is_empty() || from.iter().any(|peer| peer_matches(peer, source))
                });
                ports_ok && from_ok
            })
    })
}

/// Each NetworkPolicy selects the pods of exactly one workload, the one of its own name, and
/// every workload's pods are selected by exactly one (hostNetwork pods, which NetworkPolicy
/// does not isolate, by none).
fn check_policy_selection(c: &Combo, docs: &[Value]) {
    let policies = kind(docs, "NetworkPolicy");
    for (workload, spec) in pod_specs(docs) {
        let name = workload["metadata"]["name"].as_str().expect("name");
        let pod_labels = labels_of(&workload["spec"]["template"]["metadata"]["labels"]);
        let selecting: Vec<&str> = policies
            .iter()
            .filter(|p| selector_matches(&p["spec"]["podSelector"], &pod_labels))
            .map(|p| p["metadata"]["name"].as_str().expect("name"))
            .collect();
        if spec["hostNetwork"] == true {
            assert!(selecting.is_empty(), "{}: {name} is hostNetwork", c.name);
        } else {
            assert_eq!(
                selecting,
                vec![name],
                "{}: policies selecting {name}",
                c.name
            );
        }
    }
    for p in &policies {
        assert_eq!(
            p["metadata"].get("namespace"),
            None,
            "in the release namespace"
        );
        assert!(
            !p["spec"]["podSelector"]["matchLabels"]
                .as_object()
                .is_none_or(|m| m.is_empty()),
            "{}: {} must not select every pod",
            c.name,
            p["metadata"]["name"]
        );
        for rule in p["spec"]["ingress"].as_array().expect("ingress rules") {
            assert!(
                rule["ports"].as_array().is_some_and(|p| !p.is_empty()),
                "{}: every rule names its ports: {rule}",
                c.name
            );
        }
    }
}

#[test]
fn network_policies_select_each_workload_and_admit_only_the_intended_peers() {
    let outsider = pod_in("other", &[("app", "curious")]);
    let neighbour = pod_in(NAMESPACE, &[("app", "neighbour")]);
    let device = ip("203.0.113.9");
    let node = ip("10.0.3.7");
    for c in combos() {
        let docs = render(&c, &[]);
        check_policy_selection(&c, &docs);
        let allowed = |kind_: &str, name: &str, port: &str, source: &Source| {
            ingress_allowed(&docs, kind_, &full(name), port, source)
        };
        let gateway = chart_pod(&docs, "Deployment", &full("gateway"));
        let bridge = kind(&docs, "Deployment")
            .iter()
            .any(|d| d["metadata"]["name"] == full("bridge-api"))
            .then(|| chart_pod(&docs, "Deployment", &full("bridge-api")));
        let peers_combo = c.name == "networkpolicy-peers-values";
        // Prometheus: a pod of the release namespace, or of its own namespace where so set.
        let prometheus = if peers_combo {
            pod_in("monitoring", &[("app.kubernetes.io/name", "prometheus")])
        } else {
            neighbour.clone()
        };

        // The gateways' device port: the load balancer, and nobody else.
        let nginx = kind(&docs, "Deployment")
            .into_iter()
            .find(|d| d["metadata"]["name"] == full("nginx"));
        // With the ingress controller in the release namespace and no
        // networkPolicy.ingressController.podSelector, that namespace's pods are the peer (the
        // documented default): the release's own pods are then not told apart from it.
        let mut namespace_wide = false;
        let balancer = match nginx {
            Some(n) if n["spec"]["template"]["spec"]["hostNetwork"] == true => node.clone(),
            Some(_) => chart_pod(&docs, "Deployment", &full("nginx")),
            None => {
                let lb = container(one(&docs, "Deployment", &full("lb-sync")), "lb-sync");
                let namespace = env_value(lb, "DEVGATE_CONFIGMAP_NAMESPACE");
                let controller = pod_in(&namespace, &[("app.kubernetes.io/name", "nginx-ingress")]);
                let other = pod_in(&namespace, &[("app.kubernetes.io/name", "cert-manager")]);
                // The controller's namespace only; its other pods too unless narrowed.
                assert_eq!(
                    allowed("Deployment", "gateway", "device", &other),
                    !peers_combo,
                    "{}",
                    c.name
                );
                namespace_wide = namespace == NAMESPACE && !peers_combo;
                controller
            }
        };
        assert!(
            allowed("Deployment", "gateway", "device", &balancer),
            "{}: the load balancer reaches the gateways",
            c.name
        );
        let release_pods: Vec<&Source> = if namespace_wide {
            vec![]
        } else {
            [&neighbour, &gateway]
                .into_iter()
                .chain(bridge.as_ref())
                .collect()
        };
        for source in [&outsider, &device].into_iter().chain(release_pods) {
            assert!(
                !allowed("Deployment", "gateway", "device", source),
                "{}: {source:?} must not reach the gateways' device port",
                c.name
            );
        }
        if c.name == "hostnetwork-values" {
            // Addresses outside networkPolicy.gateway.deviceFrom stay out.
            assert!(!allowed("Deployment", "gateway", "device", &ip("10.1.0.1")));
        }

        // Metrics and health: monitoring only.
        let mut metrics = vec![("Deployment", "gateway", "http")];
        if bridge.is_some() {
            metrics.push(("Deployment", "bridge-api", "http"));
        }
        match nginx {
            Some(n) if n["spec"]["template"]["spec"]["hostNetwork"] != true => {
                metrics.push(("Deployment", "nginx", "health"));
                metrics.push(("Deployment", "nginx", "http"));
            }
            Some(_) => {}
            None => metrics.push(("Deployment", "lb-sync", "http")),
        }
        for (kind_, name, port) in metrics {
            assert!(
                allowed(kind_, name, port, &prometheus),
                "{}: monitoring reaches {name}:{port}",
                c.name
            );
            assert!(
                !allowed(kind_, name, port, &outsider),
                "{}: {name}:{port} closed to other namespaces",
                c.name
            );
            assert!(
                !allowed(kind_, name, port, &device),
                "{}: {name}:{port} closed outside the cluster",
                c.name
            );
            if peers_combo && name != "bridge-api" {
                assert!(
                    !allowed(kind_, name, port, &neighbour),
                    "{}: monitoring.allowNamespace=false closes {name}:{port}",
                    c.name
                );
            }
        }

        // nginx's device port is the public entry.
        if let Some(n) = nginx
            && n["spec"]["template"]["spec"]["hostNetwork"] != true
        {
            for source in [&device, &outsider, &neighbour] {
                assert!(
                    allowed("Deployment", "nginx", "device", source),
                    "{}",
                    c.name
                );
            }
        }

        // bridge-api: the namespace (and configured callers), not the world.
        if bridge.is_some() {
            assert!(
                allowed("Deployment", "bridge-api", "http", &neighbour),
                "{}",
                c.name
            );
            let backend = pod_in("backend", &[("app", "orders")]);
            assert_eq!(
                allowed("Deployment", "bridge-api", "http", &backend),
                peers_combo,
                "{}: callers of networkPolicy.bridgeApi.from",
                c.name
            );
        }

        // The in-cluster NATS: clients on 4222, routes on 6222, monitoring closed by default.
        if kind(&docs, "StatefulSet").is_empty() {
            continue;
        }
        let nats = chart_pod(&docs, "StatefulSet", &full("nats"));
        let nats_allowed =
            |port: &str, source: &Source| allowed("StatefulSet", "nats", port, source);
        let labelled_client = pod_in(NAMESPACE, &[("devgate.io/nats-client", "true")]);
        for source in [&gateway, &labelled_client]
            .into_iter()
            .chain(bridge.as_ref())
        {
            assert!(
                nats_allowed("client", source),
                "{}: {source:?} is a NATS client",
                c.name
            );
        }
        let labelled_elsewhere = pod_in("other", &[("devgate.io/nats-client", "true")]);
        for source in [
            &neighbour,
            &outsider,
            &labelled_elsewhere,
            &device,
            &balancer,
        ] {
            assert!(
                !nats_allowed("client", source),
                "{}: {source:?} must not reach NATS' client port",
                c.name
            );
        }
        let backend = pod_in("backend", &[("app", "orders")]);
        assert_eq!(nats_allowed("client", &backend), peers_combo, "{}", c.name);
        assert!(
            nats_allowed("cluster", &nats),
            "{}: routes between NATS pods",
            c.name
        );
        for source in [&gateway, &neighbour, &labelled_client, &outsider, &node] {
            assert!(
                !nats_allowed("cluster", source),
                "{}: {source:?} must not reach NATS' route port",
                c.name
            );
        }
        for source in [&nats, &gateway, &neighbour, &prometheus, &outsider, &node] {
            assert!(
                !nats_allowed("monitor", source),
                "{}: {source:?} must not reach NATS monitoring (/subsz lists the devices)",
                c.name
            );
        }
        let exporter = pod_in(
            "monitoring",
            &[("app.kubernetes.io/name", "prometheus-nats-exporter")],
        );
        assert_eq!(
            nats_allowed("monitor", &exporter),
            peers_combo,
            "{}",
            c.name
        );
    }
}

#[test]
fn network_policies_follow_their_values_and_disappear_when_disabled() {
    let default = combo("default");
    for c in combos() {
        let docs = render(&c, &["networkPolicy.enabled=false"]);
        assert!(kind(&docs, "NetworkPolicy").is_empty(), "{}", c.name);
    }
    // Disabled, hostNetwork nginx needs no deviceFrom.
    let docs = render(
        &default,
        &["networkPolicy.enabled=false", "nginx.hostNetwork=true"],
    );
    assert!(kind(&docs, "NetworkPolicy").is_empty());

    let default_docs = render(&default, &[]);
    let names: BTreeSet<&str> = kind(&default_docs, "NetworkPolicy")
        .iter()
        .map(|p| p["metadata"]["name"].as_str().expect("name"))
        .collect();
    let expected: BTreeSet<String> = ["gateway", "bridge-api", "nginx", "nats"]
        .iter()
        .map(|n| full(n))
        .collect();
    assert_eq!(
        names,
        expected.iter().map(String::as_str).collect(),
        "rendered by default"
    );

    // A bridge-api Service exposed outside the cluster is reachable from outside.
    let docs = render(&default, &["bridgeApi.service.type=LoadBalancer"]);
    let bridge = full("bridge-api");
    assert!(ingress_allowed(
        &docs,
        "Deployment",
        &bridge,
        "http",
        &ip("198.51.100.4")
    ));
    assert!(!ingress_allowed(
        &default_docs,
        "Deployment",
        &bridge,
        "http",
        &ip("198.51.100.4")
    ));

    // No monitoring peers at all: the metrics ports close, nothing else opens.
    let docs = render(&default, &["networkPolicy.monitoring.allowNamespace=false"]);
    let neighbour = pod_in(NAMESPACE, &[("app", "neighbour")]);
    let gateway = full("gateway");
    assert!(!ingress_allowed(
        &docs,
        "Deployment",
        &gateway,
        "http",
        &neighbour
    ));
    assert!(!ingress_allowed(
        &docs,
        "Deployment",
        &full("nginx"),
        "http",
        &neighbour
    ));
    assert!(ingress_allowed(
        &docs,
        "Deployment",
        &bridge,
        "http",
        &neighbour
    ));
    // No callers for bridge-api either: closed, not open to all.
    let docs = render(
        &default,
        &[
            "networkPolicy.monitoring.allowNamespace=false",
            "networkPolicy.bridgeApi.allowNamespace=false",
        ],
    );
    assert!(!ingress_allowed(
        &docs,
        "Deployment",
        &bridge,
        "http",
        &neighbour
    ));
    assert!(!ingress_allowed(
        &docs,
        "Deployment",
        &bridge,
        "http",
        &ip("198.51.100.4")
    ));

    // No NATS client label: only devgate's own pods.
    let docs = render(&default, &["networkPolicy.nats.clientPodLabels=null"]);
    let labelled = pod_in(NAMESPACE, &[("devgate.io/nats-client", "true")]);
    let nats = full("nats");
    assert!(!ingress_allowed(
        &docs,
        "StatefulSet",
        &nats,
        "client",
        &labelled
    ));
    let gw_pod = chart_pod(&docs, "Deployment", &gateway);
    assert!(ingress_allowed(
        &docs,
        "StatefulSet",
        &nats,
        "client",
        &gw_pod
    ));

    // The ingress controller in the release namespace: by default its namespace's pods; with
    // networkPolicy.ingressController.podSelector, its own only.
    let docs = render(&combo("ingress-controller-values"), &[]);
    assert!(ingress_allowed(
        &docs,
        "Deployment",
        &gateway,
        "device",
        &neighbour
    ));
    let docs = render(
        &combo("ingress-controller-values"),
        &["networkPolicy.ingressController.podSelector.matchLabels.app=nginx-ingress"],
    );
    let controller = pod_in(NAMESPACE, &[("app", "nginx-ingress")]);
    assert!(ingress_allowed(
        &docs,
        "Deployment",
        &gateway,
        "device",
        &controller
    ));
    assert!(!ingress_allowed(
        &docs,
        "Deployment",
        &gateway,
        "device",
        &neighbour
    ));
    assert!(!ingress_allowed(
        &docs,
        "Deployment",
        &gateway,
        "device",
        &pod_in("ingress-nginx", &[])
    ));
    let docs = render(&combo("ingress-controller-other-namespace-values"), &[]);
    assert!(ingress_allowed(
        &docs,
        "Deployment",
        &gateway,
        "device",
        &pod_in("ingress-nginx", &[("app", "anything")])
    ));
    assert!(!ingress_allowed(
        &docs,
        "Deployment",
        &gateway,
        "device",
        &neighbour
    ));
}

/// The gateway's configuration in the pod: its container's env as the kubelet sets it (secrets
/// from the rendered Secret, the pod's name and address), parsed as flags ([`env_flags`]) and
/// checked by the gateway's own validation, as at its start.
fn gateway_config(docs: &[Value]) -> devgate_gateway::config::Config {
    gateway_config_in(docs, None)
}

/// [`gateway_config`], with the pod's device TLS paths moved under `root` (where
/// [`place_device_tls`] put the files): the gateway's validation loads them.
fn gateway_config_in(docs: &[Value], root: Option<&Path>) -> devgate_gateway::config::Config {
    let deploy = one(docs, "Deployment", &full("gateway"));
    let env = pod_env(
        container(deploy, "gateway"),
        &secret_data(docs),
        &format!("{}-7d9f-x2x4q", full("gateway")),
    );
    let args = env_flags(
        "devgate-gateway",
        env.into_iter()
            .filter(|(name, _)| name != "POD_IP")
            .map(|(name, value)| match root {
                Some(root) => (name, relocate(&value, root)),
                None => (name, value),
            }),
    );
    let cli = <devgate_gateway::config::Cli as clap::Parser>::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("the gateway refuses the chart's env {args:?}: {e}"));
    cli.into_config()
        .unwrap_or_else(|e| panic!("the gateway refuses the chart's settings: {e}"))
}

/// bridge-api's configuration in the pod, as [`gateway_config`] for the gateway.
fn bridge_api_config(docs: &[Value]) -> devgate_bridge_api::config::Config {
    let deploy = one(docs, "Deployment", &full("bridge-api"));
    let env = pod_env(container(deploy, "bridge-api"), &secret_data(docs), "");
    let args = env_flags("devgate-bridge-api", env);
    let cli = <devgate_bridge_api::config::Cli as clap::Parser>::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("bridge-api refuses the chart's env {args:?}: {e}"));
    cli.into_config()
        .unwrap_or_else(|e| panic!("bridge-api refuses the chart's settings: {e}"))
}

/// The fields `keys` of a configuration, as the config file spells them.
fn config_fields(config: &impl serde::Serialize, keys: &[&str]) -> BTreeMap<String, Value> {
    let all = serde_json::to_value(config).expect("config serializes");
    keys.iter()
        .map(|k| ((*k).to_owned(), all[*k].clone()))
        .collect()
}

/// The gateway's limits the chart sets: env var, config key and the chart's default.
const GATEWAY_LIMITS: [(&str, &str, &str); 12] = [
    ("DEVGATE_MAX_HANDSHAKES", "max_handshakes", "2048"),
    ("DEVGATE_MAX_HELLO_LEN", "max_hello_len", "4096"),
    ("DEVGATE_HELLO_TIMEOUT_MS", "hello_timeout_ms", "10000"),
    (
        "DEVGATE_SESSION_QUEUE_BYTES",
        "session_queue_bytes",
        "262144",
    ),
    ("DEVGATE_MAX_INFLIGHT", "max_inflight", "256"),
    ("DEVGATE_ACK_TIMEOUT_MS", "ack_timeout_ms", "30000"),
    ("DEVGATE_WRITE_TIMEOUT_MS", "write_timeout_ms", "30000"),
    ("DEVGATE_MAX_LOGINS_PER_ID", "max_logins_per_id", "20"),
    ("DEVGATE_LOGIN_WINDOW_S", "login_window_s", "60"),
    ("DEVGATE_UP_RATE_MSGS", "up_rate_msgs", "1000"),
    ("DEVGATE_UP_RATE_BYTES", "up_rate_bytes", "1048576"),
    ("DEVGATE_UP_BURST_MS", "up_burst_ms", "2000"),
];

/// bridge-api's limits the chart sets, likewise.
const BRIDGE_API_LIMITS: [(&str, &str, &str); 7] = [
    ("DEVGATE_MAX_TAILS", "max_tails", "64"),
    ("DEVGATE_MAX_WILDCARD_TAILS", "max_wildcard_tails", "4"),
    ("DEVGATE_TAIL_BUFFER_BYTES", "tail_buffer_bytes", "1048576"),
    ("DEVGATE_DEFAULT_TIMEOUT_MS", "default_timeout_ms", "5000"),
    ("DEVGATE_REQUEST_TIMEOUT_MS", "request_timeout_ms", "65000"),
    ("DEVGATE_BULK_MAX_DEVICES", "bulk_max_devices", "1000"),
    ("DEVGATE_BULK_CONCURRENCY", "bulk_concurrency", "64"),
];

const DENYLIST_DIR: &str = "/etc/devgate/denied-devices";
const DENYLIST_FILE: &str = "/etc/devgate/denied-devices/denied-devices";

/// The gateway pod's `denied-devices` volume and the gateway container's mount of it.
fn denylist_volume(docs: &[Value]) -> (Option<&Value>, Option<&Value>) {
    gateway_volume(docs, "denied-devices")
}

/// Every limit is a value rendered explicitly, and the defaults are the binaries' own: the
/// chart's env, read by the gateway's and bridge-api's own configuration code, gives their
/// `Config::default()`. Nothing optional is set by default: no PROXY trust list (the
/// NetworkPolicy admits only nginx), an empty denylist (mounted all the same, so the first
/// revocation restarts nothing), and the previous fleet secret is an optional Secret reference
/// to a key the chart-created Secret does not have.
#[test]
fn the_gateway_and_bridge_api_limits_render_with_the_binaries_defaults() {
    let docs = render(&combo("default"), &[]);
    let deploy = one(&docs, "Deployment", &full("gateway"));
    let gw = container(deploy, "gateway");
    let env = env_values(gw);
    for (name, _, value) in GATEWAY_LIMITS {
        assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
    }
    let keys = GATEWAY_LIMITS.map(|(_, key, _)| key);
    assert_eq!(
        config_fields(&gateway_config(&docs), &keys),
        config_fields(&devgate_gateway::config::Config::default(), &keys),
        "the chart's gateway defaults are the gateway's"
    );
    assert!(!env.contains_key("DEVGATE_PROXY_TRUSTED_CIDRS"), "{env:?}");
    let empty = one(&docs, "ConfigMap", &full("denied-devices"));
    assert_eq!(empty["data"], json!({"denied-devices": ""}));
    let previous: Vec<&Value> = gw["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter(|e| e["name"] == "DEVGATE_AUTH_SECRET_PREVIOUS")
        .collect();
    assert_eq!(
        previous,
        [
            &json!({"name": "DEVGATE_AUTH_SECRET_PREVIOUS", "valueFrom": {"secretKeyRef": {
                "name": RELEASE, "key": "device-auth-secret-previous", "optional": true,
            }}})
        ]
    );
    assert!(!secret_data(&docs).contains_key("device-auth-secret-previous"));
    let config = gateway_config(&docs);
    assert!(config.auth_secret_previous.is_none());
    assert_eq!(
        config.denied_devices_file.as_deref(),
        Some(Path::new(DENYLIST_FILE))
    );

    let bridge = container(one(&docs, "Deployment", &full("bridge-api")), "bridge-api");
    let env = env_values(bridge);
    for (name, _, value) in BRIDGE_API_LIMITS {
        assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
    }
    let keys = BRIDGE_API_LIMITS.map(|(_, key, _)| key);
    assert_eq!(
        config_fields(&bridge_api_config(&docs), &keys),
        config_fields(&devgate_bridge_api::config::Config::default(), &keys),
        "the chart's bridge-api defaults are bridge-api's"
    );
}

#[test]
fn the_limits_and_the_proxy_trust_list_follow_their_values() {
    let docs = render(
        &combo("security-knobs-values"),
        &[
            "gateway.maxInflight=64",
            "gateway.ackTimeoutMs=90000",
            "bridgeApi.defaultTimeoutMs=10000",
        ],
    );
    let gw = container(one(&docs, "Deployment", &full("gateway")), "gateway");
    let env = env_values(gw);
    assert_eq!(
        env["DEVGATE_PROXY_TRUSTED_CIDRS"],
        "10.244.0.0/16,fd00:10:244::/56"
    );
    for (name, value) in [
        ("DEVGATE_UP_RATE_MSGS", "200"),
        // Above 999999 from a values file (a float to Helm): still digits, not 2.097152e+06.
        ("DEVGATE_UP_RATE_BYTES", "2097152"),
        ("DEVGATE_UP_BURST_MS", "5000"),
        ("DEVGATE_MAX_HANDSHAKES", "4096"),
        ("DEVGATE_HELLO_TIMEOUT_MS", "5000"),
        ("DEVGATE_MAX_INFLIGHT", "64"),
        ("DEVGATE_ACK_TIMEOUT_MS", "90000"),
    ] {
        assert_eq!(env[name], value, "{name}");
    }
    let config = gateway_config(&docs);
    assert_eq!(
        config
            .proxy_trusted_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.244.0.0/16", "fd00:10:244::/56"]
    );
    assert_eq!(
        (
            config.up_rate_msgs,
            config.up_rate_bytes,
            config.up_burst_ms
        ),
        (200, 2_097_152, 5000)
    );

    let bridge = container(one(&docs, "Deployment", &full("bridge-api")), "bridge-api");
    let env = env_values(bridge);
    for (name, value) in [
        ("DEVGATE_MAX_TAILS", "256"),
        ("DEVGATE_MAX_WILDCARD_TAILS", "8"),
        ("DEVGATE_TAIL_BUFFER_BYTES", "2097152"),
        ("DEVGATE_DEFAULT_TIMEOUT_MS", "10000"),
        ("DEVGATE_BULK_MAX_DEVICES", "5000"),
        ("DEVGATE_BULK_CONCURRENCY", "128"),
    ] {
        assert_eq!(env[name], value, "{name}");
    }
    let config = bridge_api_config(&docs);
    assert_eq!(
        (
            config.max_tails,
            config.max_wildcard_tails,
            config.tail_buffer_bytes
        ),
        (256, 8, 2_097_152)
    );
}

/// A fleet-secret rotation: the previous secret is in the Secret (and so reaches the gateways)
/// only while it is set, never generated or kept; values the gateway would refuse, or that
/// would rotate to the same secret, stop the render.
#[test]
fn a_fleet_secret_rotation_adds_the_previous_secret_only_while_it_is_set() {
    const OLD: &str = "fleet-secret-old-0123456789";
    const NEW: &str = "fleet-secret-new-0123456789";
    let docs = render(&combo("security-knobs-values"), &[]);
    let data = secret_data(&docs);
    assert_eq!(data["device-auth-secret"], NEW);
    assert_eq!(data["device-auth-secret-previous"], OLD);
    for d in docs.iter().filter(|d| d["kind"] != "Secret") {
        assert!(
            !d.to_string().contains(OLD),
            "{} {} contains the previous secret",
            d["kind"],
            d["metadata"]["name"]
        );
    }
    let config = gateway_config(&docs);
    assert_eq!(
        config.auth_secret_previous.as_ref().map(|s| s.expose()),
        Some(OLD)
    );
    assert_eq!(config.auth_secret.as_ref().map(|s| s.expose()), Some(NEW));

    // The rotation ends with an upgrade without it: the key goes, it is not kept.
    let installed = secrets_of(&docs);
    let done = render_against(&installed, &[&format!("secrets.deviceAuthSecret={NEW}")])
        .expect("upgrade without the previous secret");
    let secret = one(&done, "Secret", RELEASE);
    assert!(secret["data"].get("device-auth-secret-previous").is_none());
    assert!(gateway_config(&done).auth_secret_previous.is_none());

    let default = combo("default");
    let previous = |v: &str| format!("secrets.deviceAuthSecretPrevious={v}");
    for (sets, needle) in [
        (
            vec![previous("short-secret")],
            "secrets.deviceAuthSecretPrevious must be at least 16 characters",
        ),
        (
            vec![format!("secrets.deviceAuthSecret={NEW}"), previous(NEW)],
            "secrets.deviceAuthSecretPrevious equals the current fleet secret",
        ),
        (
            vec![previous(&format!(" {OLD}"))],
            "secrets.deviceAuthSecretPrevious must not begin or end with whitespace",
        ),
        (
            vec![previous(&format!("{OLD}\t"))],
            "secrets.deviceAuthSecretPrevious must not begin or end with whitespace",
        ),
        (
            vec![
                "secrets.existingSecret=devgate-secrets".to_owned(),
                previous(OLD),
            ],
            "put the previous fleet secret in that Secret, key device-auth-secret-previous",
        ),
    ] {
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        assert_refused(&default, &sets, needle);
    }
    // Setting only the previous secret on an upgrade would keep the generated current one: the
    // same secret twice, which is no rotation. The kept one counts as the current one.
    let installed = secrets_of(&render(&default, &[]));
    let kept = base64_decode(
        installed[RELEASE]["data"]["device-auth-secret"]
            .as_str()
            .expect("kept secret"),
    );
    let kept = String::from_utf8(kept).expect("utf8");
    let err = render_against(&installed, &[&previous(&kept)]).expect_err("same as the kept one");
    assert!(err.contains("equals the current fleet secret"), "{err}");
    render_against(&installed, &[&previous(OLD)]).expect("a previous secret that differs");

    // An existing Secret may carry the key: the reference is optional, so it works either way.
    let docs = render(&combo("external-nats-values"), &[]);
    let gw = container(one(&docs, "Deployment", &full("gateway")), "gateway");
    let r = gw["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "DEVGATE_AUTH_SECRET_PREVIOUS")
        .map(|e| &e["valueFrom"]["secretKeyRef"])
        .expect("previous secret reference");
    assert_eq!(
        r,
        &json!({"name": "devgate-secrets", "key": "device-auth-secret-previous", "optional": true})
    );
}

/// The `checksum/secrets` annotation of each workload that reads the Secret, by workload
/// (`None`: no annotation).
fn secret_checksums(docs: &[Value]) -> BTreeMap<&'static str, Option<String>> {
    [
        ("gateway", one(docs, "Deployment", &full("gateway"))),
        ("bridge-api", one(docs, "Deployment", &full("bridge-api"))),
        ("nats", one(docs, "StatefulSet", &full("nats"))),
    ]
    .into_iter()
    .map(|(name, workload)| {
        let annotation =
            workload["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"]
                .as_str()
                .map(str::to_owned);
        (name, annotation)
    })
    .collect()
}

/// A NATS password changes without cutting anyone off. A NATS user has one password, so
/// changing it in place leaves the clients still holding the old one locked out until they
/// restart. Instead the role moves to its twin user, whose password the servers already have
/// (NATS does not roll), and then the unused user's password changes (only NATS rolls; the
/// role's pods, on the twin, do not).
#[test]
fn a_nats_password_changes_by_moving_the_role_to_its_twin_user() {
    let c = combo("default");
    let template = |docs: &[Value], kind: &str, name: &str| {
        one(docs, kind, &full(name))["spec"]["template"].clone()
    };
    let nats_login = |docs: &[Value], name: &str| -> (String, String) {
        let c = container(one(docs, "Deployment", &full(name)), name);
        let key = c["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == "DEVGATE_NATS_PASSWORD")
            .expect("password env")["valueFrom"]["secretKeyRef"]["key"]
            .as_str()
            .expect("key")
            .to_owned();
        (env_value(c, "DEVGATE_NATS_USER"), key)
    };
    let given = [
        "secrets.nats.gatewayPassword=GatewayOne",
        "secrets.nats.gatewayAltPassword=GatewayAlt",
    ];
    let before = render(&c, &given);
    assert_eq!(
        nats_login(&before, "gateway"),
        ("gateway".into(), "nats-gateway-password".into())
    );

    // 1. The gateways move to gateway-alt: they roll; NATS and bridge-api do not.
    let moved_sets = [given[0], given[1], "nats.userSlot.gateway=alt"];
    let moved = render(&c, &moved_sets);
    assert_eq!(
        nats_login(&moved, "gateway"),
        ("gateway-alt".into(), "nats-gateway-alt-password".into())
    );
    assert_ne!(
        template(&before, "Deployment", "gateway"),
        template(&moved, "Deployment", "gateway")
    );
    assert_eq!(
        template(&before, "StatefulSet", "nats"),
        template(&moved, "StatefulSet", "nats"),
        "NATS already knows gateway-alt's password"
    );
    assert_eq!(
        template(&before, "Deployment", "bridge-api"),
        template(&moved, "Deployment", "bridge-api")
    );

    // 2. The unused user's password changes: NATS rolls, the gateways (on the twin) do not.
    let changed_sets = [
        moved_sets[0],
        moved_sets[1],
        moved_sets[2],
        "secrets.nats.gatewayPassword=GatewayTwo",
    ];
    let changed = render(&c, &changed_sets);
    assert_eq!(
        template(&moved, "Deployment", "gateway"),
        template(&changed, "Deployment", "gateway"),
        "nobody is on the user whose password changed"
    );
    assert_ne!(
        template(&moved, "StatefulSet", "nats"),
        template(&changed, "StatefulSet", "nats")
    );
    let secret = secret_data(&changed);
    assert_eq!(secret["nats-gateway-password"], "GatewayTwo");
    assert_eq!(secret["nats-gateway-alt-password"], "GatewayAlt");
    // The NATS pods get every user's password, twins included.
    let nats = container(one(&changed, "StatefulSet", &full("nats")), "nats");
    for var in [
        "DEVGATE_NATS_GATEWAY_ALT_PASSWORD",
        "DEVGATE_NATS_BRIDGE_API_ALT_PASSWORD",
        "DEVGATE_NATS_LB_SYNC_ALT_PASSWORD",
        "DEVGATE_NATS_SERVICE_ALT_PASSWORD",
    ] {
        assert!(
            nats["env"]
                .as_array()
                .expect("env")
                .iter()
                .any(|e| e["name"] == var),
            "{var}"
        );
    }

    // The twins are the chart's own NATS's; an existing NATS has the users it has.
    assert_refused(
        &combo("external-nats-values"),
        &["nats.userSlot.bridgeApi=alt"],
        "nats.userSlot.bridgeApi=alt is for the chart's own NATS",
    );
    assert_refused(&c, &["nats.userSlot.gateway=b"], "must be primary or alt");
}

/// Pods read Secret values only when they start: an upgrade that changes a token or password
/// rolls exactly the workloads that read it, and nothing else (a generated secret, kept across
/// upgrades, never does).
#[test]
fn a_changed_secret_value_rolls_exactly_the_workloads_that_read_it() {
    let default = combo("default");
    let base = secret_checksums(&render(&default, &[]));
    assert!(base.values().all(Option::is_some), "{base:?}");
    assert_eq!(
        secret_checksums(&render(&default, &[])),
        base,
        "a render that generates new random secrets changes nothing"
    );
    for (set, rolled) in [
        (
            "secrets.deviceAuthSecret=another-fleet-secret-0123",
            &["gateway"][..],
        ),
        (
            "secrets.deviceAuthSecretPrevious=a-previous-fleet-secret-0",
            &["gateway"],
        ),
        (
            "secrets.apiTokens[0]=another-api-token-0123456",
            &["bridge-api"],
        ),
        (
            "secrets.apiReadTokens[0]=a-read-only-api-token-012",
            &["bridge-api"],
        ),
        (
            "secrets.nats.gatewayPassword=AnotherPassword",
            &["gateway", "nats"],
        ),
        (
            "secrets.nats.bridgeApiPassword=AnotherPassword",
            &["bridge-api", "nats"],
        ),
        ("secrets.nats.servicePassword=AnotherPassword", &["nats"]),
        // The twin users: only NATS has them until a role moves to one.
        ("secrets.nats.gatewayAltPassword=AnotherPassword", &["nats"]),
        ("secrets.nats.serviceAltPassword=AnotherPassword", &["nats"]),
        ("secrets.nats.routePassword=AnotherPassword", &["nats"]),
    ] {
        let changed = secret_checksums(&render(&default, &[set]));
        let differs: Vec<&str> = base
            .iter()
            .filter(|(name, sum)| changed[*name] != **sum)
            .map(|(name, _)| *name)
            .collect();
        let mut expected = rolled.to_vec();
        expected.sort_unstable();
        assert_eq!(differs, expected, "{set}");
    }
    // An existing Secret's content is unknown to the chart: no annotation to mislead.
    let existing = secret_checksums(&render(
        &default,
        &["secrets.existingSecret=devgate-secrets"],
    ));
    assert!(existing.values().all(Option::is_none), "{existing:?}");
}

/// Read-only API tokens reach bridge-api as their own optional Secret key, present only while
/// some are listed, and a token may not be of both kinds.
#[test]
fn read_only_api_tokens_are_an_optional_secret_key_bridge_api_reads() {
    const READERS: [&str; 2] = [
        "dashboard-read-token-0123456789",
        "grafana-read-token-0123456789",
    ];
    let docs = render(&combo("security-knobs-values"), &[]);
    assert_eq!(secret_data(&docs)["api-read-tokens"], READERS.join(","));
    let config = bridge_api_config(&docs);
    let read: Vec<&str> = config.api_read_tokens.iter().map(|t| t.expose()).collect();
    assert_eq!(read, READERS);
    let writers: Vec<&str> = config.api_tokens.iter().map(|t| t.expose()).collect();
    assert_eq!(writers, ["service-api-token-0123456789"]);

    // Without any, there is no key, and bridge-api has full tokens only.
    let default = combo("default");
    let docs = render(&default, &[]);
    assert!(!secret_data(&docs).contains_key("api-read-tokens"));
    assert!(bridge_api_config(&docs).api_read_tokens.is_empty());
    let api = container(one(&docs, "Deployment", &full("bridge-api")), "bridge-api");
    let r = api["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "DEVGATE_API_READ_TOKEN")
        .map(|e| &e["valueFrom"]["secretKeyRef"])
        .expect("read token reference");
    assert_eq!(
        r,
        &json!({"name": RELEASE, "key": "api-read-tokens", "optional": true})
    );

    for (sets, needle) in [
        (
            vec!["secrets.apiReadTokens[0]=short"],
            "every secrets.apiReadTokens entry must be at least 16 characters",
        ),
        (
            vec![
                "secrets.apiTokens[0]=the-same-token-0123456789",
                "secrets.apiReadTokens[0]=the-same-token-0123456789",
            ],
            "a token is in both secrets.apiTokens and secrets.apiReadTokens",
        ),
        (
            vec![
                "secrets.existingSecret=devgate-secrets",
                "secrets.apiReadTokens[0]=dashboard-read-token-0123456789",
            ],
            "key api-read-tokens",
        ),
    ] {
        assert_refused(&default, &sets, needle);
    }
}

/// The device denylist reaches the gateways as a file in a directory-mounted ConfigMap (a
/// subPath mount would never see an update), from the chart's own ConfigMap or an existing one,
/// and its changes restart nothing: the gateway re-reads the file.
#[test]
fn the_device_denylist_is_a_directory_mounted_configmap_the_gateway_reads() {
    let docs = render(&combo("security-knobs-values"), &[]);
    let cm = one(&docs, "ConfigMap", &full("denied-devices"));
    assert_eq!(
        cm["data"],
        json!({"denied-devices": "leaked-device-1\nlost_device_2\n"})
    );
    let (volume, mount) = denylist_volume(&docs);
    assert_eq!(
        volume,
        Some(&json!({"name": "denied-devices", "configMap": {
            "name": full("denied-devices"),
            "items": [{"key": "denied-devices", "path": "denied-devices"}],
        }}))
    );
    let mount = mount.expect("the gateway mounts the denylist");
    assert_eq!(
        mount,
        &json!({"name": "denied-devices", "mountPath": DENYLIST_DIR, "readOnly": true}),
        "a directory mount, without subPath"
    );
    let deploy = one(&docs, "Deployment", &full("gateway"));
    let gw = container(deploy, "gateway");
    assert_eq!(env_value(gw, "DEVGATE_DENIED_DEVICES_FILE"), DENYLIST_FILE);
    assert_eq!(
        gateway_config(&docs).denied_devices_file.as_deref(),
        Some(Path::new(DENYLIST_FILE))
    );
    // A revocation must not roll the gateways: the pod template is the same with no ids, with
    // the first, and with more (nothing in it follows the list).
    let template = |sets: &[&str]| {
        let docs = render(&combo("default"), sets);
        one(&docs, "Deployment", &full("gateway"))["spec"]["template"].clone()
    };
    let none = template(&[]);
    assert_eq!(template(&["gateway.deniedDevices={dev-1}"]), none);
    assert_eq!(template(&["gateway.deniedDevices={dev-1,dev-2}"]), none);

    // An existing ConfigMap (a revocation is then a kubectl apply), not with the list.
    assert_refused(
        &combo("default"),
        &[
            "gateway.deniedDevicesConfigMap=revoked-devices",
            "gateway.deniedDevices={dev-1}",
        ],
        "gateway.deniedDevices and gateway.deniedDevicesConfigMap are both set",
    );
    {
        let sets = ["gateway.deniedDevicesConfigMap=revoked-devices"];
        let docs = render(&combo("default"), &sets);
        assert!(
            kind(&docs, "ConfigMap")
                .iter()
                .all(|c| c["metadata"]["name"] != full("denied-devices").as_str()),
            "{sets:?}: no ConfigMap of the chart's"
        );
        let (volume, mount) = denylist_volume(&docs);
        assert_eq!(
            volume.map(|v| &v["configMap"]["name"]),
            Some(&json!("revoked-devices")),
            "{sets:?}"
        );
        assert!(mount.is_some_and(|m| m["subPath"].is_null()), "{sets:?}");
        let gw = container(one(&docs, "Deployment", &full("gateway")), "gateway");
        assert_eq!(env_value(gw, "DEVGATE_DENIED_DEVICES_FILE"), DENYLIST_FILE);
    }

    // With NATS TLS the pod has both volumes.
    let docs = render(
        &combo("nats-tls-values"),
        &["gateway.deniedDevices={dev-1}"],
    );
    let deploy = one(&docs, "Deployment", &full("gateway"));
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .expect("list")
            .iter()
            .map(|v| v["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(
        names(&deploy["spec"]["template"]["spec"]["volumes"]),
        ["nats-tls", "denied-devices"]
    );
    assert_eq!(
        names(&container(deploy, "gateway")["volumeMounts"]),
        ["nats-tls", "denied-devices"]
    );

    // Ids follow the device id rule (gateway/src/contract.rs): 1 to 128 of [A-Za-z0-9_-].
    let longest = "d".repeat(128);
    let (_dir, ok) = values_file(
        "denylist-longest",
        &format!("gateway:\n  deniedDevices: [\"{longest}\", \"0123\"]\n"),
    );
    let docs = render(&ok, &[]);
    assert_eq!(
        one(&docs, "ConfigMap", &full("denied-devices"))["data"]["denied-devices"],
        format!("{longest}\n0123\n")
    );
    for (i, (ids, needle)) in [
        (r#"[""]"#, r#"entry "" is not a device id"#),
        (r#"["dev 1"]"#, r#"entry "dev 1" is not a device id"#),
        (r#"[" dev-1"]"#, r#"entry " dev-1" is not a device id"#),
        (r#"["dev-1\n"]"#, r#"entry "dev-1\n" is not a device id"#),
        (r#"["dev.1"]"#, r#"entry "dev.1" is not a device id"#),
        (r#"["dev*"]"#, r#"entry "dev*" is not a device id"#),
        (&*format!(r#"["{longest}d"]"#), "is not a device id"),
        // YAML reads 0123 as a number (83): refused rather than denying another id.
        ("[0123]", "is not a string: quote ids"),
    ]
    .into_iter()
    .enumerate()
    {
        let (_dir, bad) = values_file(
            &format!("denylist-bad-{i}"),
            &format!("gateway:\n  deniedDevices: {ids}\n"),
        );
        let err = try_template(&bad, &[]).expect_err(&format!("{ids} must be refused"));
        assert!(
            err.contains(needle),
            "{ids}: expected {needle:?} in:\n{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Device TLS at the gateways (nginx.tls.mode=passthrough)
// ---------------------------------------------------------------------------------------------

/// Where the gateway container mounts the device TLS Secret and the client CA Secret.
const GATEWAY_DEVICE_TLS_DIR: &str = "/etc/devgate/device-tls";
const GATEWAY_DEVICE_CLIENT_CA_DIR: &str = "/etc/devgate/device-client-ca";

/// The gateway pod's volume `name` and the gateway container's mount of it.
fn gateway_volume<'a>(docs: &'a [Value], name: &str) -> (Option<&'a Value>, Option<&'a Value>) {
    let deploy = one(docs, "Deployment", &full("gateway"));
    let volume = deploy["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name));
    let mount = container(deploy, "gateway")["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name));
    (volume, mount)
}

/// The gateway's device TLS as in the pod: the files placed where its volumes mount them (the
/// rendered Secret, or fixtures for Secrets made outside the chart), its env parsed and checked
/// by the gateway's own validation (which loads them), and what it then serves.
fn gateway_device_tls(
    docs: &[Value],
    root: &Path,
) -> (
    devgate_gateway::config::Config,
    devgate_gateway::device_tls::DeviceTls,
) {
    let deploy = one(docs, "Deployment", &full("gateway"));
    place_device_tls(docs, root, deploy, "gateway");
    let config = gateway_config_in(docs, Some(root));
    let files = config
        .device_tls_files()
        .expect("the gateway terminates device TLS");
    let tls = devgate_gateway::device_tls::DeviceTls::load(files)
        .unwrap_or_else(|e| panic!("the gateway cannot load the mounted files: {e}"));
    (config, tls)
}

/// A device's TLS handshake with a gateway serving `server`, in memory: the device trusts the
/// PEM CA file `ca`, checks `name`, and presents the fixture certificate `device` (and its key)
/// when given. `Err` says which side refused, and why.
fn device_handshake(
    server: std::sync::Arc<rustls::ServerConfig>,
    ca: &Path,
    name: &str,
    device: Option<&str>,
) -> Result<(), String> {
    use devgate_gateway::bus::tls::{TlsFiles, client_config_named};
    use devgate_tests::nats::tls_fixture;

    let files = TlsFiles {
        ca: Some(ca.to_path_buf()),
        client: device.map(|d| {
            (
                tls_fixture(&format!("{d}.pem")),
                tls_fixture(&format!("{d}.key")),
            )
        }),
    };
    let client_config = client_config_named(&files, "device").expect("device TLS settings");
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("server name");
    let mut device = rustls::Connection::from(
        rustls::ClientConnection::new(client_config, name).expect("client connection"),
    );
    let mut gateway =
        rustls::Connection::from(rustls::ServerConnection::new(server).expect("server connection"));
    // Moves what `from` has to send into `to`.
    fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) -> Result<(), String> {
        let mut bytes = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut bytes).expect("write to memory");
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).expect("read from memory");
            to.process_new_packets().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    for _ in 0..10 {
        if !device.is_handshaking() && !gateway.is_handshaking() {
            return Ok(());
        }
        pump(&mut device, &mut gateway).map_err(|e| format!("the gateway refused: {e}"))?;
        pump(&mut gateway, &mut device).map_err(|e| format!("the device refused: {e}"))?;
    }
    Err("the handshake did not finish".to_owned())
}

/// With `nginx.tls.mode=passthrough` the gateways end the devices' TLS: the certificate Secret
/// (here cert-manager's) and the device CA are Secret volumes mounted as directories (a subPath
/// mount never sees a renewal), readable by the gateway's user, and the env names the files;
/// the gateway's own validation loads them, and it then serves a TLS that only devices holding a
/// certificate from that CA complete, bound to their ids. Without a client CA nothing of it is
/// mounted or set.
#[test]
fn passthrough_mounts_the_device_certificate_and_client_ca_into_the_gateways() {
    use devgate_tests::nats::tls_fixture;

    let docs = render(&combo("device-tls-passthrough-values"), &[]);
    let deploy = one(&docs, "Deployment", &full("gateway"));
    let gw = container(deploy, "gateway");
    let env = env_values(gw);
    for (name, value) in [
        (
            "DEVGATE_DEVICE_TLS_CERT",
            format!("{GATEWAY_DEVICE_TLS_DIR}/tls.crt"),
        ),
        (
            "DEVGATE_DEVICE_TLS_KEY",
            format!("{GATEWAY_DEVICE_TLS_DIR}/tls.key"),
        ),
        (
            "DEVGATE_DEVICE_TLS_CLIENT_CA",
            format!("{GATEWAY_DEVICE_CLIENT_CA_DIR}/ca.crt"),
        ),
        ("DEVGATE_DEVICE_TLS_CHECK_MS", "10000".to_owned()),
    ] {
        assert_eq!(env.get(name), Some(&value), "{name}");
    }
    let (volume, mount) = gateway_volume(&docs, "device-tls");
    assert_eq!(
        volume,
        Some(&json!({"name": "device-tls", "secret": {
            "secretName": "devgate-device-tls",
            "defaultMode": 0o440,
            "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
        }}))
    );
    assert_eq!(
        mount,
        Some(&json!({"name": "device-tls", "mountPath": GATEWAY_DEVICE_TLS_DIR, "readOnly": true})),
        "a directory mount, without subPath"
    );
    let (volume, mount) = gateway_volume(&docs, "device-client-ca");
    assert_eq!(
        volume,
        Some(&json!({"name": "device-client-ca", "secret": {
            "secretName": "devgate-device-client-ca",
            "defaultMode": 0o440,
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        }}))
    );
    assert_eq!(
        mount,
        Some(
            &json!({"name": "device-client-ca", "mountPath": GATEWAY_DEVICE_CLIENT_CA_DIR, "readOnly": true})
        )
    );
    // 0440 files belong to root and the pod's fsGroup: the gateway's user must be in it.
    let pod_security = &deploy["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod_security["fsGroup"], pod_security["runAsGroup"]);

    // The gateway's own validation accepts the env with the files in place (the test server
    // certificate and CA standing in for the Secrets), and the TLS it serves takes a device
    // certificate from the client CA, and no other, for the name devices dial.
    let root = tempfile::tempdir().expect("tempdir");
    let (config, tls) = gateway_device_tls(&docs, root.path());
    assert_eq!(
        config.device_tls_files(),
        Some(devgate_gateway::device_tls::DeviceTlsFiles {
            cert: PathBuf::from(relocate(
                &format!("{GATEWAY_DEVICE_TLS_DIR}/tls.crt"),
                root.path()
            )),
            key: PathBuf::from(relocate(
                &format!("{GATEWAY_DEVICE_TLS_DIR}/tls.key"),
                root.path()
            )),
            client_ca: Some(PathBuf::from(relocate(
                &format!("{GATEWAY_DEVICE_CLIENT_CA_DIR}/ca.crt"),
                root.path()
            ))),
        })
    );
    assert_eq!(config.device_tls_check_ms, 10_000);
    assert!(tls.binds_ids(), "certificates are bound to device ids");
    let ca = tls_fixture("ca.pem");
    device_handshake(tls.config(), &ca, "localhost", Some("device"))
        .expect("a device certificate from the client CA");
    for (device, why) in [
        (None, "no device certificate"),
        (
            Some("untrusted-device"),
            "a certificate the client CA did not sign",
        ),
    ] {
        let err = device_handshake(tls.config(), &ca, "localhost", device)
            .expect_err(&format!("{why} must be refused"));
        assert!(err.starts_with("the gateway refused"), "{why}: {err}");
    }

    // The renewal check follows nginx.tls.checkIntervalS; without a client CA, no CA at all.
    let docs = render(
        &combo("device-tls-passthrough-values"),
        &["nginx.tls.clientCaSecret=", "nginx.tls.checkIntervalS=30"],
    );
    let env = env_values(container(
        one(&docs, "Deployment", &full("gateway")),
        "gateway",
    ));
    assert!(!env.contains_key("DEVGATE_DEVICE_TLS_CLIENT_CA"), "{env:?}");
    assert_eq!(gateway_volume(&docs, "device-client-ca"), (None, None));
    let root = tempfile::tempdir().expect("tempdir");
    let (config, tls) = gateway_device_tls(&docs, root.path());
    assert_eq!(config.device_tls_check_ms, 30_000);
    assert!(!tls.binds_ids());
    device_handshake(tls.config(), &ca, "localhost", None).expect("TLS without a client CA");

    // nginx terminating TLS (the default): the gateways have none of it.
    let docs = render(&combo("default"), &[]);
    let env = env_values(container(
        one(&docs, "Deployment", &full("gateway")),
        "gateway",
    ));
    assert!(
        env.keys().all(|k| !k.starts_with("DEVGATE_DEVICE_TLS_")),
        "{env:?}"
    );
    assert_eq!(gateway_volume(&docs, "device-tls"), (None, None));
    assert!(gateway_config(&docs).device_tls_files().is_none());
}

/// Without `existingSecret`, passthrough uses the chart's generated certificate (the same
/// Secret and CA nginx would use, so moving from nginx's TLS to the gateways' keeps what devices
/// trust), and the gateways serve it for the names devices dial. A new certificate (here: each
/// `helm template` issues one) changes nothing in the gateways' pod template, since they re-read
/// the files: a renewal rolls no gateway.
#[test]
fn passthrough_serves_the_generated_certificate_and_a_renewal_rolls_no_gateway() {
    let sets = [
        "nginx.tls.mode=passthrough",
        "nginx.tls.dnsNames={devices.example.com}",
    ];
    let docs = render(&combo("default"), &sets);
    let tls_secret = one(&docs, "Secret", &full("device-tls"));
    assert_eq!(
        gateway_volume(&docs, "device-tls")
            .0
            .map(|v| &v["secret"]["secretName"]),
        Some(&json!(full("device-tls")))
    );
    let root = tempfile::tempdir().expect("tempdir");
    let (_, tls) = gateway_device_tls(&docs, root.path());
    let ca = root.path().join("device-ca.crt");
    std::fs::write(
        &ca,
        base64_decode(tls_secret["data"]["ca.crt"].as_str().expect("ca.crt")),
    )
    .expect("write CA");
    for name in [full("nginx"), "devices.example.com".to_owned()] {
        device_handshake(tls.config(), &ca, &name, None)
            .unwrap_or_else(|e| panic!("devices dialling {name}: {e}"));
    }
    let err = device_handshake(tls.config(), &ca, "elsewhere.example.com", None)
        .expect_err("a name not in the certificate");
    assert!(err.starts_with("the device refused"), "{err}");
    // Any certificate expiring in a century or less, still valid: what the alert watches.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(tls.not_after() > now, "{}", tls.not_after());

    let again = render(&combo("default"), &sets);
    assert_ne!(
        one(&again, "Secret", &full("device-tls"))["data"]["tls.crt"],
        tls_secret["data"]["tls.crt"],
        "each render without the cluster issues a new certificate"
    );
    let template =
        |docs: &[Value]| one(docs, "Deployment", &full("gateway"))["spec"]["template"].clone();
    assert_eq!(
        template(&again),
        template(&docs),
        "a new certificate must not roll the gateways"
    );

    // An install with nginx's TLS upgraded to passthrough keeps the CA and the certificate.
    let installed = secrets_of(&render(
        &combo("default"),
        &["nginx.tls.dnsNames={devices.example.com}"],
    ));
    let upgraded = secrets_of(&render_against(&installed, &sets).expect("upgrade"));
    for name in [full("device-ca"), full("device-tls")] {
        assert_eq!(upgraded[&name]["data"], installed[&name]["data"], "{name}");
    }
}

/// nginx does no TLS with passthrough: its pod mounts no device TLS, lb-sync is told to pass the
/// bytes through (its own validation accepts the env: neither TLS nor plaintext asked for) and
/// renders a plain listener that `nginx -t` accepts (in
/// `the_rendered_nginx_config_passes_nginx_t_through_lb_syncs_own_command`).
#[test]
fn passthrough_leaves_nginx_without_tls_and_tells_lb_sync_to_pass_the_bytes_through() {
    let docs = render(&combo("device-tls-passthrough-values"), &[]);
    let deploy = one(&docs, "Deployment", &full("nginx"));
    let spec = &deploy["spec"]["template"]["spec"];
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|v| v["name"].as_str().expect("name").to_owned())
            .collect()
    };
    for name in names(&spec["volumes"])
        .into_iter()
        .chain(names(&container(deploy, "nginx")["volumeMounts"]))
        .chain(names(&container(deploy, "lb-sync")["volumeMounts"]))
    {
        assert!(!name.starts_with("device-"), "nginx's pod has {name}");
    }
    let lb = container(deploy, "lb-sync");
    let env = env_values(lb);
    assert_eq!(
        env.get("DEVGATE_TLS_PASSTHROUGH").map(String::as_str),
        Some("true")
    );
    for absent in [
        "DEVGATE_TLS_CERT",
        "DEVGATE_TLS_KEY",
        "DEVGATE_TLS_CLIENT_CA",
        "DEVGATE_INSECURE_PLAINTEXT",
    ] {
        assert!(!env.contains_key(absent), "{absent}: {env:?}");
    }
    let root = tempfile::tempdir().expect("tempdir");
    // The upstream's directory, which lb-sync checks at its start.
    let output = relocate(&env["DEVGATE_OUTPUT"], root.path());
    std::fs::create_dir_all(Path::new(&output).parent().expect("directory")).expect("mkdir");
    let config = lb_sync_config(lb, root.path());
    assert!(config.tls_passthrough && !config.insecure_plaintext);
    assert!(
        config.render_settings().tls.is_none(),
        "nginx terminates nothing"
    );
    let upstream = lb_sync_render(lb, root.path());
    assert!(upstream.contains("listen 0.0.0.0:7000;"), "{upstream}");
    assert!(
        upstream.contains("device TLS passes through to the gateways"),
        "{upstream}"
    );
    assert!(
        upstream
            .lines()
            .map(str::trim)
            .all(|l| l.starts_with('#') || !l.contains("ssl")),
        "{upstream}"
    );
}

/// The ingress controller's stream listener forwards bytes, so TLS at the gateways works
/// behind it: lb-sync asks for passthrough (its configmap sink accepts it), and the gateways
/// serve a certificate for the controller's name, which the values must give.
#[test]
fn passthrough_works_behind_the_ingress_controller() {
    let sets = [
        "nginx.tls.mode=passthrough",
        "nginx.tls.dnsNames={devices.example.com}",
    ];
    for name in [
        "ingress-controller-values",
        "ingress-controller-other-namespace-values",
    ] {
        let docs = render(&combo(name), &sets);
        let lb = container(one(&docs, "Deployment", &full("lb-sync")), "lb-sync");
        let env = env_values(lb);
        assert_eq!(
            env.get("DEVGATE_TLS_PASSTHROUGH").map(String::as_str),
            Some("true"),
            "{name}"
        );
        assert!(!env.contains_key("DEVGATE_INSECURE_PLAINTEXT"), "{name}");
        let root = tempfile::tempdir().expect("tempdir");
        let config = lb_sync_config(lb, root.path());
        assert_eq!(config.sink, devgate_lb_sync::config::SinkKind::Configmap);
        assert!(
            config.tls_passthrough && !config.insecure_plaintext,
            "{name}"
        );
        let (_, tls) = gateway_device_tls(&docs, root.path());
        let ca = root.path().join("device-ca.crt");
        std::fs::write(
            &ca,
            base64_decode(
                one(&docs, "Secret", &full("device-tls"))["data"]["ca.crt"]
                    .as_str()
                    .expect("ca.crt"),
            ),
        )
        .expect("write CA");
        device_handshake(tls.config(), &ca, "devices.example.com", None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The controller's name is not the chart's to know.
    assert_refused(
        &combo("ingress-controller-values"),
        &["nginx.tls.mode=passthrough"],
        "whose name the generated certificate cannot know",
    );
    // A certificate of one's own names it already.
    let docs = render(
        &combo("ingress-controller-values"),
        &[
            "nginx.tls.mode=passthrough",
            "nginx.tls.existingSecret=devgate-device-tls",
        ],
    );
    assert!(
        kind(&docs, "Secret")
            .iter()
            .all(|s| s["metadata"]["name"] != full("device-tls").as_str())
    );
    assert_eq!(
        gateway_volume(&docs, "device-tls")
            .0
            .map(|v| &v["secret"]["secretName"]),
        Some(&json!("devgate-device-tls"))
    );
}

/// What passthrough cannot do is refused with the way out: nginx's TLS settings that the
/// gateways do not have, a CA for a certificate the chart does not generate, device TLS
/// through extraEnv, and no check interval.
#[test]
fn passthrough_refuses_settings_the_gateways_would_not_honour() {
    let passthrough = combo("device-tls-passthrough-values");
    for (sets, needle) in [
        (
            vec!["nginx.tls.protocols={TLSv1.3}"],
            "nginx.tls.protocols [TLSv1.3] are nginx's: with nginx.tls.mode=passthrough the gateways",
        ),
        (
            vec!["nginx.tls.verifyDepth=1"],
            "nginx.tls.verifyDepth 1 is nginx's: with nginx.tls.mode=passthrough the gateways check",
        ),
        (
            vec!["nginx.tls.ca.cert=x", "nginx.tls.ca.key=y"],
            "or passthrough without nginx.tls.existingSecret",
        ),
        (
            vec![
                "gateway.extraEnv[0].name=DEVGATE_DEVICE_TLS_CHECK_MS",
                "gateway.extraEnv[0].value=1000",
            ],
            "TLS at the gateways is nginx.tls.mode=passthrough",
        ),
        (
            vec!["nginx.tls.checkIntervalS=0"],
            "nginx.tls.checkIntervalS must be at least 1",
        ),
        (
            vec!["nginx.tls.checkIntervalS=10s"],
            "nginx.tls.checkIntervalS must be a whole number",
        ),
        // The gateway refuses a period over a day: its pods would crash-loop.
        (
            vec!["nginx.tls.checkIntervalS=86401"],
            "nginx.tls.checkIntervalS 86401: with nginx.tls.mode=passthrough the gateways re-read",
        ),
    ] {
        assert_refused(&passthrough, &sets, needle);
    }
    template(&passthrough, &["nginx.tls.checkIntervalS=86400"]);
    // One Secret for the server certificate and the device CA is allowed, with a warning.
    let shared_ca = notes_with(
        "device-tls-passthrough-values",
        &["nginx.tls.clientCaSecret=devgate-device-tls"],
    );
    for needle in [
        "WARNING: this is also the gateways' own certificate Secret",
        // A CN counts as well as a DNS SAN, and with tokens the token is still needed.
        "any certificate it signs that names a device id\n   passes that device's certificate check",
    ] {
        assert!(shared_ca.contains(needle), "{needle:?}: {shared_ca}");
    }
    let own_ca = notes("device-tls-passthrough-values");
    assert!(!own_ca.contains("WARNING: this is also"), "{own_ca}");
    // Device TLS through extraEnv is refused in nginx's modes too: nginx would terminate TLS
    // in front of gateways that expect a handshake.
    assert_refused(
        &combo("default"),
        &[
            "gateway.extraEnv[0].name=DEVGATE_DEVICE_TLS_CERT",
            "gateway.extraEnv[0].value=/tls/tls.crt",
        ],
        "gateway.extraEnv sets DEVGATE_DEVICE_TLS_CERT: TLS at the gateways is nginx.tls.mode=passthrough",
    );
    // The default protocols in another order are the same set.
    render(&passthrough, &["nginx.tls.protocols={TLSv1.3,TLSv1.2}"]);
}

/// Names of the gateway container's env entries, literal or from a Secret.
fn gateway_env_names(docs: &[Value]) -> Vec<String> {
    container(one(docs, "Deployment", &full("gateway")), "gateway")["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_owned())
        .collect()
}

/// `gateway.deviceAuth=certificate`: the device's certificate alone authenticates it. The
/// gateways get `DEVGATE_DEVICE_AUTH=certificate` and no fleet secret (which they refuse), their
/// own validation accepts the env with the files in place, and a changed fleet secret rolls no
/// gateway. The default stays token: the fleet secret and no `DEVGATE_DEVICE_AUTH`.
#[test]
fn certificate_device_auth_gives_the_gateways_no_fleet_secret() {
    use devgate_gateway::auth::DeviceAuth;
    use devgate_gateway::config::DeviceAuthMode;

    let passthrough = combo("device-tls-passthrough-values");
    let certificate = ["gateway.deviceAuth=certificate"];
    let docs = render(&passthrough, &certificate);
    let names = gateway_env_names(&docs);
    assert!(
        !names.iter().any(|n| n.starts_with("DEVGATE_AUTH_SECRET")),
        "no fleet secret for the gateway: {names:?}"
    );
    let env = env_values(container(
        one(&docs, "Deployment", &full("gateway")),
        "gateway",
    ));
    assert_eq!(
        env.get("DEVGATE_DEVICE_AUTH").map(String::as_str),
        Some("certificate")
    );
    let root = tempfile::tempdir().expect("tempdir");
    let (config, tls) = gateway_device_tls(&docs, root.path());
    assert_eq!(config.device_auth, DeviceAuthMode::Certificate);
    assert!(config.auth_secret.is_none() && config.auth_secret_previous.is_none());
    assert!(matches!(config.device_auth(), DeviceAuth::Certificate));
    assert!(tls.binds_ids(), "certificates are bound to device ids");
    // The Secret keeps the key (for a switch back), but the gateway does not read it: changing
    // it must not roll the gateways.
    assert!(secret_data(&docs).contains_key("device-auth-secret"));
    let gateway_sum = |sets: &[&str]| {
        secret_checksums(&render(&passthrough, sets))["gateway"]
            .clone()
            .expect("checksum/secrets")
    };
    assert_eq!(
        gateway_sum(&["gateway.deviceAuth=certificate"]),
        gateway_sum(&[
            "gateway.deviceAuth=certificate",
            "secrets.deviceAuthSecret=another-fleet-secret-0123",
        ]),
        "the fleet secret rolls no gateway that does not read it"
    );
    assert_ne!(
        gateway_sum(&["gateway.deviceAuth=certificate"]),
        gateway_sum(&[
            "gateway.deviceAuth=certificate",
            "secrets.nats.gatewayPassword=AnotherPassword",
        ]),
        "the gateway's NATS password still rolls it"
    );

    // NOTES: no token to compute; the simulator needs only the device's certificate.
    let cert_notes = notes_with("device-tls-passthrough-values", &certificate);
    for needle in [
        "Devices authenticate with their TLS client certificate alone (gateway.deviceAuth=certificate)",
        "it alone logs them in as that id",
        "without DEVGATE_AUTH_SECRET it sends an empty token",
        "--tls-cert dev-1.crt --tls-key dev-1.key --devices 1",
    ] {
        assert!(
            cert_notes.contains(needle),
            "NOTES lack {needle:?}:\n{cert_notes}"
        );
    }
    for absent in ["openssl dgst", "device-auth-secret", "a leaked token"] {
        assert!(
            !cert_notes.contains(absent),
            "NOTES mention {absent:?}:\n{cert_notes}"
        );
    }

    // The default is token, with or without TLS at the gateways.
    let default = combo("default");
    for (c, sets, tls_at_gateways) in [
        (&passthrough, &[][..], true),
        (&passthrough, &["gateway.deviceAuth=token"][..], true),
        (&default, &[][..], false),
    ] {
        let docs = render(c, sets);
        let names = gateway_env_names(&docs);
        assert!(
            !names.iter().any(|n| n == "DEVGATE_DEVICE_AUTH"),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n == "DEVGATE_AUTH_SECRET"),
            "{names:?}"
        );
        let root = tempfile::tempdir().expect("tempdir");
        let config = if tls_at_gateways {
            gateway_device_tls(&docs, root.path()).0
        } else {
            gateway_config(&docs)
        };
        assert_eq!(config.device_auth, DeviceAuthMode::Token, "{sets:?}");
        assert!(matches!(config.device_auth(), DeviceAuth::Hmac { .. }));
    }
    let notes = notes("device-tls-passthrough-values");
    assert!(notes.contains("openssl dgst"), "{notes}");
    assert!(
        !notes.contains("gateway.deviceAuth=certificate)"),
        "{notes}"
    );
}

/// What certificate authentication cannot work without, or would not use, is refused with the
/// way out: TLS ending anywhere but the gateways, no client CA, a previous fleet secret, the
/// setting through extraEnv, and an unknown mode.
#[test]
fn certificate_device_auth_refuses_what_it_cannot_honour() {
    let passthrough = combo("device-tls-passthrough-values");
    let default = combo("default");
    for (c, sets, needle) in [
        (
            &default,
            vec!["gateway.deviceAuth=certificate"],
            "gateway.deviceAuth=certificate: the gateways check the device certificates themselves, so device TLS must end at them; set nginx.tls.mode=passthrough (not generate)",
        ),
        (
            &default,
            vec![
                "gateway.deviceAuth=certificate",
                "nginx.tls.clientCaSecret=devgate-device-client-ca",
            ],
            "set nginx.tls.mode=passthrough (not generate)",
        ),
        (
            &default,
            vec!["gateway.deviceAuth=certificate", "nginx.tls.mode=plaintext"],
            "set nginx.tls.mode=passthrough (not plaintext)",
        ),
        (
            &passthrough,
            vec![
                "gateway.deviceAuth=certificate",
                "nginx.tls.clientCaSecret=",
            ],
            "gateway.deviceAuth=certificate needs nginx.tls.clientCaSecret",
        ),
        (
            &passthrough,
            vec![
                "gateway.deviceAuth=certificate",
                "secrets.deviceAuthSecretPrevious=a-previous-fleet-secret-0",
            ],
            "secrets.deviceAuthSecretPrevious is not used with gateway.deviceAuth=certificate",
        ),
        (
            &passthrough,
            vec![
                "gateway.extraEnv[0].name=DEVGATE_DEVICE_AUTH",
                "gateway.extraEnv[0].value=certificate",
            ],
            "gateway.extraEnv sets DEVGATE_DEVICE_AUTH, which the chart sets from its own value",
        ),
        (
            &passthrough,
            vec!["gateway.deviceAuth=hmac"],
            "gateway.deviceAuth \"hmac\": choose token",
        ),
    ] {
        assert_refused(c, &sets, needle);
    }
    // A previous fleet secret is still fine with tokens.
    template(
        &passthrough,
        &["secrets.deviceAuthSecretPrevious=a-previous-fleet-secret-0"],
    );
}

/// A Secret's files belong to root (and the pod's fsGroup): a container that does not run as
/// root reads those not readable by all (the chart's 0440) only through its pod's fsGroup.
#[test]
fn every_mounted_secret_is_readable_by_its_containers_user() {
    let mut checked = 0;
    for c in combos() {
        // As given, and with TLS at the gateways (where the values allow it).
        let passthrough = [
            "nginx.tls.mode=passthrough",
            "nginx.tls.clientCaSecret=ca",
            "nginx.tls.dnsNames={devices.example.com}",
        ];
        for sets in [&[][..], &passthrough[..]] {
            let Ok(yaml) = try_template(&c, sets) else {
                continue;
            };
            for (workload, spec) in pod_specs(&parse(&yaml)) {
                let pod = &spec["securityContext"];
                for v in spec["volumes"].as_array().into_iter().flatten() {
                    let Some(mode) = v["secret"]["defaultMode"].as_u64() else {
                        continue;
                    };
                    if mode & 0o004 != 0 || pod["runAsUser"] == 0 {
                        continue;
                    }
                    checked += 1;
                    assert!(
                        mode & 0o040 != 0 && pod["fsGroup"].is_u64(),
                        "{} ({}): Secret volume {} ({mode:o}) is unreadable without an fsGroup",
                        workload["metadata"]["name"],
                        c.name,
                        v["name"]
                    );
                }
            }
        }
    }
    assert!(checked > 10, "{checked} Secret volumes checked");
}

// ---------------------------------------------------------------------------------------------
// Alerts and dashboard (metrics.prometheusRule, metrics.grafanaDashboard)
// ---------------------------------------------------------------------------------------------

/// Every query of the chart's alerts and dashboard, as `(where, PromQL)`, with the dashboard's
/// variables set as Grafana would for this release.
fn monitoring_queries(docs: &[Value]) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let rule = one(docs, "PrometheusRule", RELEASE);
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            queries.push((
                format!("alert {}", r["alert"].as_str().expect("alert name")),
                r["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    let dashboard = dashboard(docs);
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$namespace", NAMESPACE)
                .replace("$release", RELEASE)
                .replace("$__rate_interval", "2m");
            queries.push((format!("panel {:?}", panel["title"]), expr));
        }
    }
    queries
}

fn dashboard(docs: &[Value]) -> Value {
    let cm = one(docs, "ConfigMap", &full("grafana-dashboard"));
    let key = format!("devgate-{NAMESPACE}-{RELEASE}.json");
    serde_json::from_str(
        cm["data"][&key]
            .as_str()
            .expect("dashboard text under its key"),
    )
    .expect("the dashboard is JSON")
}

/// The series one component's `/metrics` exposes: sample name → the label sets of its samples.
type Exposition = BTreeMap<String, Vec<BTreeMap<String, String>>>;

/// What the binaries' own registries expose, each built as its binary builds it; bridge-api's
/// per-request series are recorded by its own middleware for the statuses the alerts name.
async fn exported_metrics() -> Exposition {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use prometheus_client::registry::Registry;
    use tower::ServiceExt as _;

    let mut text = String::new();
    let mut gateway = Registry::default();
    let _gateway = devgate_gateway::metrics::Metrics::new(&mut gateway);
    prometheus_client::encoding::text::encode(&mut text, &gateway).expect("encode");

    let mut lb_sync = Registry::default();
    devgate_lb_sync::metrics::Metrics::default().register(&mut lb_sync);
    prometheus_client::encoding::text::encode(&mut text, &lb_sync).expect("encode");

    let bridge = devgate_bridge_api::metrics::Metrics::new();
    let _tails = (bridge.sse_tails(false), bridge.sse_tails(true));
    let app = axum::Router::new()
        .route(
            "/v1/devices/{id}/messages",
            axum::routing::post(
                |axum::extract::Path(status): axum::extract::Path<u16>| async move {
                    StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT)
                },
            ),
        )
        .layer(axum::middleware::from_fn_with_state(
            bridge.clone(),
            devgate_bridge_api::metrics::track,
        ));
    for status in [200, 404, 500, 502, 503, 504] {
        let response = app
            .clone()
            .oneshot(
                Request::post(format!("/v1/devices/{status}/messages"))
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(response.status().as_u16(), status);
    }
    prometheus_client::encoding::text::encode(&mut text, &bridge.registry()).expect("encode");
    parse_exposition(&text)
}

/// Sample lines of the OpenMetrics text format (the encoder's output: no escapes in values).
fn parse_exposition(text: &str) -> Exposition {
    let mut out = Exposition::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _value) = line.rsplit_once(' ').expect("sample value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').expect("label pair");
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        out.entry(name.to_owned()).or_default().push(labels);
    }
    out
}

/// Every vector selector of a PromQL expression (also those inside range selectors).
fn selectors(expr: &promql_parser::parser::Expr) -> Vec<promql_parser::parser::VectorSelector> {
    use promql_parser::parser::Expr;
    struct Collect(Vec<promql_parser::parser::VectorSelector>);
    impl promql_parser::util::ExprVisitor for Collect {
        type Error = std::convert::Infallible;
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, Self::Error> {
            match e {
                Expr::VectorSelector(vs) => self.0.push(vs.clone()),
                Expr::MatrixSelector(ms) => self.0.push(ms.vs.clone()),
                _ => {}
            }
            Ok(true)
        }
    }
    let mut c = Collect(Vec::new());
    let Ok(_) = promql_parser::util::walk_expr(&mut c, expr);
    c.0
}

/// The component whose metrics a name belongs to (`None`: Prometheus' own `up`).
fn component_of(metric: &str) -> Option<&'static str> {
    if metric == "up" {
        return None;
    }
    [
        ("devgate_gateway_", "gateway"),
        ("devgate_bridge_", "bridge-api"),
        ("devgate_lb_sync_", "lb-sync"),
    ]
    .into_iter()
    .find(|(prefix, _)| metric.starts_with(prefix))
    .map(|(_, component)| component)
    .or_else(|| panic!("{metric}: not a metric of devgate"))
}

#[tokio::test]
async fn alerts_and_dashboard_query_this_releases_jobs_for_metrics_the_binaries_export() {
    use promql_parser::label::MatchOp;

    let docs = render(&combo("autoscaling-monitoring-values"), &[]);
    let exported = exported_metrics().await;
    let queries = monitoring_queries(&docs);
    assert!(queries.len() > 30, "alerts and panels: {}", queries.len());
    for (what, query) in &queries {
        let expr = promql_parser::parser::parse(query)
            .unwrap_or_else(|e| panic!("{what}: {query}\ndoes not parse: {e}"));
        let found = selectors(&expr);
        assert!(!found.is_empty(), "{what} selects nothing");
        for vs in found {
            let name = vs
                .name
                .clone()
                .unwrap_or_else(|| panic!("{what}: a selector without a metric name"));
            let matchers = &vs.matchers.matchers;
            assert!(
                vs.matchers.or_matchers.is_empty(),
                "{what}: `or` in a selector"
            );
            let equal = |label: &str| {
                matchers
                    .iter()
                    .find(|m| m.name == label && m.op == MatchOp::Equal)
                    .map(|m| m.value.clone())
            };
            // Scoped to this release's targets, so two releases never mix.
            assert_eq!(
                equal("namespace").as_deref(),
                Some(NAMESPACE),
                "{what}: {name} without its namespace"
            );
            let job = equal("job").unwrap_or_else(|| panic!("{what}: {name} without its job"));
            let component = component_of(&name);
            match component {
                Some(c) => assert_eq!(
                    job,
                    full(c),
                    "{what}: {name} selects another component's job"
                ),
                None => assert!(
                    ["gateway", "bridge-api", "lb-sync"]
                        .iter()
                        .any(|c| job == full(c)),
                    "{what}: up of an unknown job {job}"
                ),
            }
            if component.is_none() {
                continue;
            }
            let samples = exported
                .get(&name)
                .unwrap_or_else(|| panic!("{what}: {name} is not exported by the binaries"));
            for m in matchers
                .iter()
                .filter(|m| !["namespace", "job", "le"].contains(&m.name.as_str()))
            {
                // Each value named (an alternation of literals is a list of values) is one
                // the metric has, and a pattern matches one: a typo would select nothing and
                // the alert would never fire.
                let values: Vec<&str> = samples
                    .iter()
                    .filter_map(|labels| labels.get(&m.name).map(String::as_str))
                    .collect();
                let literal = |v: &str| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if m.value.split('|').all(literal) {
                    for value in m.value.split('|') {
                        assert!(
                            values.contains(&value),
                            "{what}: {name} has no series with {}={value:?} (it has {values:?})",
                            m.name
                        );
                    }
                } else {
                    let MatchOp::Re(re) = &m.op else {
                        panic!("{what}: {name}: a pattern in a {} matcher", m.op);
                    };
                    assert!(
                        values.iter().any(|v| re.is_match(v)),
                        "{what}: {name}: no {} matches {:?} (it has {values:?})",
                        m.name,
                        m.value
                    );
                }
            }
        }
    }
}

#[test]
fn alerts_are_complete_documented_labelled_and_can_be_left_out() {
    let deploy_md =
        std::fs::read_to_string(workspace_root().join("docs/deploy.md")).expect("deploy.md");
    let alerts_section = deploy_md
        .split_once("\n## Alerts")
        .map(|(_, rest)| rest)
        .expect("docs/deploy.md has an Alerts section");
    let docs = render(&combo("autoscaling-monitoring-values"), &[]);
    let rule = one(&docs, "PrometheusRule", RELEASE);
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    let mut names = Vec::new();
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().expect("alert").to_owned();
            let severity = r["labels"]["severity"].as_str().unwrap_or("");
            assert!(
                ["critical", "warning"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            assert_eq!(r["labels"]["team"], "devices", "{name}: alertLabels");
            for a in ["summary", "description"] {
                assert!(
                    r["annotations"][a].as_str().is_some_and(|t| t.len() > 20),
                    "{name}: no {a}"
                );
            }
            if let Some(d) = r["for"].as_str() {
                promql_parser::util::parse_duration(d)
                    .unwrap_or_else(|e| panic!("{name}: for {d}: {e}"));
            }
            assert!(
                alerts_section.contains(&format!("`{name}`")),
                "{name} is not explained in docs/deploy.md#alerts"
            );
            names.push(name);
        }
    }
    let unique: BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "alert names repeat: {names:?}");
    assert!(names.iter().any(|n| n.starts_with("DevgateBridgeApi")));

    // Left out by name; a name that is no alert is refused, listing the alerts.
    let docs = render(
        &combo("autoscaling-monitoring-values"),
        &["metrics.prometheusRule.disabled={DevgateLbSyncSlow,DevgateGatewayMassDisconnect}"],
    );
    let kept: Vec<String> = monitoring_queries(&docs)
        .into_iter()
        .filter_map(|(what, _)| what.strip_prefix("alert ").map(str::to_owned))
        .collect();
    assert_eq!(kept.len(), names.len() - 2);
    assert!(
        !kept
            .iter()
            .any(|n| n == "DevgateLbSyncSlow" || n == "DevgateGatewayMassDisconnect")
    );
    assert_refused(
        &combo("autoscaling-monitoring-values"),
        &["metrics.prometheusRule.disabled={DevgateGatewayDwon}"],
        "there is no alert DevgateGatewayDwon (the alerts: DevgateGatewaysAllDown,",
    );

    // Without bridge-api there are no bridge-api alerts, scrapes or panels' targets to scrape.
    let docs = render(
        &combo("autoscaling-monitoring-values"),
        &["bridgeApi.enabled=false"],
    );
    assert!(
        !monitoring_queries(&docs)
            .iter()
            .any(|(what, _)| what.starts_with("alert DevgateBridgeApi"))
    );
    assert!(
        kind(&docs, "ServiceMonitor")
            .iter()
            .all(|m| m["metadata"]["name"] != full("bridge-api"))
    );

    // Both select the jobs the monitors set: without them they would never match.
    for (value, needle) in [
        (
            "metrics.prometheusRule.enabled=true",
            "metrics.prometheusRule.enabled needs metrics.serviceMonitor.enabled",
        ),
        (
            "metrics.grafanaDashboard.enabled=true",
            "metrics.grafanaDashboard.enabled needs metrics.serviceMonitor.enabled",
        ),
    ] {
        assert_refused(&combo("default"), &[value], needle);
    }
    // A release upgraded with --reuse-values from a chart without these values renders (off),
    // and one without nats.userSlot stops with the way out.
    let docs = render(
        &combo("default"),
        &[
            "metrics.prometheusRule=null",
            "metrics.grafanaDashboard=null",
        ],
    );
    assert!(kind(&docs, "PrometheusRule").is_empty());
    assert_refused(
        &combo("default"),
        &["nats.userSlot=null"],
        "nats.userSlot is missing",
    );
    // Off by default: a cluster without prometheus-operator has none of its kinds.
    let docs = render(&combo("default"), &[]);
    assert!(
        docs.iter()
            .all(|d| !PROMETHEUS_OPERATOR_KINDS.contains(&d["kind"].as_str().unwrap_or("")))
    );
}

#[test]
fn each_release_gets_its_own_dashboard_opening_on_itself() {
    let docs = render(&combo("autoscaling-monitoring-values"), &[]);
    let cm = one(&docs, "ConfigMap", &full("grafana-dashboard"));
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "Devices");
    let mut shipped = dashboard(&docs);
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("files/monitoring/grafana-dashboard.json"))
            .expect("dashboard file"),
    )
    .expect("JSON");

    // Its own uid and title, and its variables start on this release.
    let uid = shipped["uid"].as_str().expect("uid").to_owned();
    assert!(uid.starts_with("devgate-") && uid.len() <= 40, "{uid}");
    assert_ne!(shipped["uid"], file["uid"]);
    assert_eq!(shipped["title"], format!("devgate {NAMESPACE}/{RELEASE}"));
    let vars = shipped["templating"]["list"]
        .as_array_mut()
        .expect("variables");
    for (name, value) in [("namespace", NAMESPACE), ("release", RELEASE)] {
        let var = vars
            .iter_mut()
            .find(|v| v["name"] == name)
            .expect("variable");
        assert_eq!(
            var["current"],
            json!({"text": value, "value": value}),
            "{name}"
        );
        var["current"] = json!({});
    }
    // Grafana extracts the release from the gateway's job with this regex.
    let release = vars
        .iter()
        .find(|v| v["name"] == "release")
        .expect("release");
    assert_eq!(release["regex"], "/^(.*)-gateway$/");
    assert_eq!(full("gateway").strip_suffix("-gateway"), Some(RELEASE));
    // Otherwise the file as it is.
    shipped["uid"] = file["uid"].clone();
    shipped["title"] = file["title"].clone();
    assert_eq!(shipped, file, "the ConfigMap carries the file");

    // Another release in the same namespace: another uid and another file for the sidecar,
    // so neither overwrites, nor on uninstall deletes, the other's.
    let other = render(
        &combo("autoscaling-monitoring-values"),
        &["fullnameOverride=other"],
    );
    let other_cm = one(&other, "ConfigMap", "other-grafana-dashboard");
    let keys = |cm: &Value| -> Vec<String> {
        cm["data"]
            .as_object()
            .expect("data")
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(
        keys(other_cm),
        vec![format!("devgate-{NAMESPACE}-other.json")]
    );
    assert_ne!(keys(other_cm), keys(cm));
    let other_dashboard: Value = serde_json::from_str(
        other_cm["data"][&format!("devgate-{NAMESPACE}-other.json")]
            .as_str()
            .expect("text"),
    )
    .expect("JSON");
    assert_ne!(other_dashboard["uid"], uid.as_str());

    let mut ids = BTreeSet::new();
    for panel in file["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "panel ids repeat"
        );
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
            assert!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{}",
                panel["title"]
            );
        }
    }
}

/// The PrometheusRule's `spec` of a default install with the alerts on, as YAML for promtool.
fn rendered_rules(strip_annotations: bool) -> String {
    let docs = render(
        &combo("default"),
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
        ],
    );
    let mut spec = one(&docs, "PrometheusRule", RELEASE)["spec"].clone();
    if strip_annotations {
        for group in spec["groups"].as_array_mut().expect("groups") {
            for rule in group["rules"].as_array_mut().expect("rules") {
                rule.as_object_mut().expect("rule").remove("annotations");
            }
        }
    }
    // JSON is YAML.
    serde_json::to_string_pretty(&spec).expect("json")
}

#[test]
fn promtool_accepts_the_alerts_and_each_fires_as_its_unit_tests_say() {
    let promtool = installed_tool("promtool", "PROMTOOL_BIN");
    let dir = tempfile::tempdir().expect("tempdir");

    // The whole rules, annotation templates included.
    let full_rules = dir.path().join("full.yaml");
    std::fs::write(&full_rules, rendered_rules(false)).expect("write");
    let out = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&full_rules));
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        text(&out)
    );

    // The unit tests, against the rules without annotations (their prose is not compared).
    std::fs::write(dir.path().join("rules.yaml"), rendered_rules(true)).expect("write");
    let cases = workspace_root().join("tests/fixtures/alerts/alerts.test.yaml");
    let cases_text = std::fs::read_to_string(&cases).expect("alert tests");
    std::fs::write(dir.path().join("alerts.test.yaml"), &cases_text).expect("write");
    let out = run(Command::new(&promtool)
        .arg("test")
        .arg("rules")
        .arg(dir.path().join("alerts.test.yaml")));
    assert!(out.status.success(), "promtool test rules:\n{}", text(&out));

    // Every alert has a case in which it fires.
    let cases: Value = parse(&cases_text).remove(0);
    let mut fired = BTreeSet::new();
    for test in cases["tests"].as_array().expect("tests") {
        for check in test["alert_rule_test"].as_array().expect("alert_rule_test") {
            if check["exp_alerts"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            {
                fired.insert(check["alertname"].as_str().expect("alertname").to_owned());
            }
        }
    }
    let docs = render(&combo("autoscaling-monitoring-values"), &[]);
    let alerts: BTreeSet<String> = monitoring_queries(&docs)
        .into_iter()
        .filter_map(|(what, _)| what.strip_prefix("alert ").map(str::to_owned))
        .collect();
    let untested: Vec<_> = alerts.difference(&fired).collect();
    assert!(
        untested.is_empty(),
        "alerts no unit test fires: {untested:?}"
    );
}
