//! Where the tools and binaries the tests run are found.

use std::path::{Path, PathBuf};

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Finds an external tool: `$<ENV>` if set, then the project's tool venv (`.tools/venv/bin`,
/// which `.ci/run` fills), then `/usr/sbin` and `$PATH`.
pub fn tool(name: &str, env: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env)
        && !p.is_empty()
    {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".tools/venv/bin").join(name);
    if venv.exists() {
        return venv;
    }
    for dir in ["/usr/sbin", "/usr/local/bin", "/usr/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("{name} not found: install it (bash .ci/run does) or set {env}")
}

/// A binary built from this workspace (`cargo test --workspace` builds them alongside the
/// tests, because the owning crates have integration tests of their own).
pub fn workspace_bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test binary location {}", exe.display()));
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build --workspace --bins` (or `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// A tool that `bash .ci/install-tools` installs into the project (`.tools/bin`, or the
/// `.tools/venv/bin` Python venv): helm, kubernetes-validate, the venv's python. `$<ENV>`
/// overrides. Panics with the command to run when it is missing, so no test skips silently.
pub fn installed_tool(name: &str, env: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env)
        && !p.is_empty()
    {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    for dir in [".tools/bin", ".tools/venv/bin"] {
        let p = root.join(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run `bash .ci/install-tools` (or set {env})")
}
