//! Rendering the Helm chart (`helm/devgate`) with the real helm binary, for the chart tests:
//! the documented values combinations, `helm template` with extra `--set`s, and the render
//! parsed into JSON documents.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::bins::{installed_tool, workspace_root};

/// The release name every render uses.
pub const RELEASE: &str = "devgate";
/// The namespace every render uses.
pub const NAMESPACE: &str = "devgate";
/// The chart in the repository.
pub fn chart() -> PathBuf {
    workspace_root().join("helm/devgate")
}

/// The helm binary installed by `.ci/install-tools` (or `$HELM_BIN`).
pub fn helm_bin() -> PathBuf {
    installed_tool("helm", "HELM_BIN")
}

/// Runs `cmd` to completion; failing to start it fails the test.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// A finished command's stdout and stderr, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A documented values combination: the defaults, or one file of `helm/devgate/ci/`.
#[derive(Debug, Clone)]
pub struct Combo {
    /// `default`, or the file stem.
    pub name: String,
    /// The values file; none for the defaults.
    pub file: Option<PathBuf>,
}

/// The defaults and every values file of `helm/devgate/ci/`.
pub fn combos() -> Vec<Combo> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .expect("helm/devgate/ci exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the documented combinations in ci/"
    );
    std::iter::once(Combo {
        name: "default".into(),
        file: None,
    })
    .chain(files.into_iter().map(|f| {
        Combo {
            name: f
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("utf8 name")
                .to_owned(),
            file: Some(f),
        }
    }))
    .collect()
}

/// The combination called `name` (`default`, or a `ci/` file stem).
pub fn combo(name: &str) -> Combo {
    combos()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no combination {name}"))
}

/// helm's `-f`/`--set` arguments for `combo` plus `sets`.
pub fn values_args(combo: &Combo, sets: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(f) = &combo.file {
        args.push("-f".to_owned());
        args.push(f.display().to_string());
    }
    for s in sets {
        args.push("--set".to_owned());
        args.push((*s).to_owned());
    }
    args
}

/// Rendering `combo` with `sets` fails, saying `needle`.
pub fn assert_refused(combo: &Combo, sets: &[&str], needle: &str) {
    let err = try_template(combo, sets).expect_err(&format!("{sets:?} must be refused"));
    assert!(
        err.contains(needle),
        "{sets:?}: expected {needle:?} in:\n{err}"
    );
}

/// `helm template` of the chart; `Err` carries helm's output.
pub fn try_template(combo: &Combo, sets: &[&str]) -> Result<String, String> {
    try_template_of(&chart(), combo, sets)
}

/// `helm template` of the chart at `chart` (the repository's, or a copy).
pub fn try_template_of(chart: &Path, combo: &Combo, sets: &[&str]) -> Result<String, String> {
    let out = run(Command::new(helm_bin())
        .args(["template", RELEASE])
        .arg(chart)
        .args(["--namespace", NAMESPACE])
        .args(values_args(combo, sets)));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(text(&out))
    }
}

/// `helm template` of the chart; a failure fails the test with helm's output.
pub fn template(combo: &Combo, sets: &[&str]) -> String {
    try_template(combo, sets)
        .unwrap_or_else(|e| panic!("helm template ({}) failed:\n{e}", combo.name))
}

/// Multi-document YAML to JSON values, with the venv's PyYAML (installed with
/// kubernetes-validate); empty documents are dropped.
pub fn parse(yaml: &str) -> Vec<Value> {
    use std::io::Write as _;
    let mut child = Command::new(installed_tool("python3", "DEVGATE_TOOLS_PYTHON"))
        .args([
            "-c",
            "import sys, json, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 from .tools/venv");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write yaml");
    let out = child.wait_with_output().expect("python output");
    assert!(out.status.success(), "YAML did not parse: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("json from python")
}

/// The chart rendered and parsed into one JSON value per document.
pub fn render(combo: &Combo, sets: &[&str]) -> Vec<Value> {
    parse(&template(combo, sets))
}

/// The documents of one kind.
pub fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The one document of kind `k` named `name`.
pub fn one<'a>(docs: &'a [Value], k: &str, name: &str) -> &'a Value {
    let found: Vec<_> = kind(docs, k)
        .into_iter()
        .filter(|d| d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {k} {name}");
    found[0]
}

/// A resource name of the release: `<release>-<name>`.
pub fn full(name: &str) -> String {
    format!("{RELEASE}-{name}")
}
