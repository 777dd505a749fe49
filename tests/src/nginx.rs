//! A real nginx with the stream module, on a free loopback port, in its own temp directory.
//!
//! The main configuration is fixed (one worker, `worker_shutdown_timeout`, the stream module);
//! the `stream { }` content lives in `upstream.conf`, which the test (or lb-sync's file sink)
//! rewrites and then reloads with [`Nginx::reload`] / [`Nginx::reload_cmd`].

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bins::tool;

/// Where Debian puts the dynamic stream module.
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// How long old workers keep serving their connections after a reload. Long enough that a
/// device connected before a reload outlives any test.
pub const WORKER_SHUTDOWN_TIMEOUT: &str = "60s";

/// A running nginx, stopped (with all its workers) on drop.
pub struct Nginx {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

/// A port that was free a moment ago on 127.0.0.1 (bound, read and released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"))
        .port()
}

/// A minimal valid `stream { }` content listening on `port` with an always-down upstream, for
/// starting nginx before anything real is known.
pub fn placeholder_stream(port: u16) -> String {
    format!(
        "upstream devgate_gateways {{\n    zone devgate_gateways 64k;\n    server 127.0.0.1:1 down;\n}}\n\
         server {{\n    listen 127.0.0.1:{port};\n    proxy_pass devgate_gateways;\n}}\n"
    )
}

impl Nginx {
    /// Starts nginx with `stream(port)` as the content of `upstream.conf`, on a free port
    /// (retried with a new port if the chosen one was taken in between).
    pub fn start(stream: impl Fn(u16) -> String) -> Nginx {
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Self::try_start(port, &stream(port)) {
                Ok(nginx) => return nginx,
                Err(e) => last_error = e,
            }
        }
        panic!("nginx did not start: {last_error}")
    }

    fn try_start(port: u16, stream: &str) -> Result<Nginx, String> {
        let dir = tempfile::Builder::new()
            .prefix("devgate-nginx-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let p = dir.path();
        let conf = format!(
            "load_module {STREAM_MODULE};\n\
             pid {pid};\n\
             error_log {log} notice;\n\
             worker_processes 1;\n\
             # Old workers keep long-lived device connections this long after a reload.\n\
             worker_shutdown_timeout {WORKER_SHUTDOWN_TIMEOUT};\n\
             events {{ worker_connections 1024; }}\n\
             stream {{ include {upstream}; }}\n",
            pid = p.join("nginx.pid").display(),
            log = p.join("error.log").display(),
            upstream = p.join("upstream.conf").display(),
        );
        std::fs::write(p.join("nginx.conf"), conf).map_err(|e| format!("nginx.conf: {e}"))?;
        std::fs::write(p.join("upstream.conf"), stream).map_err(|e| format!("upstream: {e}"))?;
        let child = Command::new(tool("nginx", "NGINX_BIN"))
            .args(Self::base_args(p))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so Drop can stop the workers even if the master is gone.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawning nginx: {e}"))?;
        let mut nginx = Nginx {
            dir,
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = nginx.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                nginx.child = None;
                return Err(format!("nginx exited with {status}: {}", nginx.error_log()));
            }
            if nginx.dir.path().join("nginx.pid").exists()
                && TcpStream::connect_timeout(&nginx.addr(), Duration::from_millis(200)).is_ok()
            {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                return Err(format!("nginx not listening: {}", nginx.error_log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn base_args(dir: &Path) -> Vec<String> {
        let d = dir.display();
        vec![
            "-p".into(),
            format!("{d}/"),
            "-c".into(),
            format!("{d}/nginx.conf"),
            "-e".into(),
            format!("{d}/error.log"),
        ]
    }

    /// The device-facing address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The device-facing port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The file included inside `stream { }`.
    pub fn upstream_path(&self) -> PathBuf {
        self.dir.path().join("upstream.conf")
    }

    /// The nginx temp directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `nginx -t` for this instance, as one whitespace-separated command line.
    pub fn validate_cmd(&self) -> String {
        let mut args = vec![
            tool("nginx", "NGINX_BIN").display().to_string(),
            "-t".into(),
            "-q".into(),
        ];
        args.extend(Self::base_args(self.dir.path()));
        args.join(" ")
    }

    /// `nginx -s reload` for this instance, as one whitespace-separated command line.
    pub fn reload_cmd(&self) -> String {
        let mut args = vec![
            tool("nginx", "NGINX_BIN").display().to_string(),
            "-s".into(),
            "reload".into(),
        ];
        args.extend(Self::base_args(self.dir.path()));
        args.join(" ")
    }

    /// Reloads the configuration (nginx answers at once; new workers follow within ms).
    pub fn reload(&self) {
        let status = Command::new(tool("nginx", "NGINX_BIN"))
            .args(["-s", "reload"])
            .args(Self::base_args(self.dir.path()))
            .status()
            .unwrap_or_else(|e| panic!("nginx -s reload: {e}"));
        assert!(
            status.success(),
            "nginx -s reload: {status}: {}",
            self.error_log()
        );
    }

    /// How many reloads nginx has completed: new workers started and the previous workers told
    /// to stop accepting (each logs "gracefully shutting down" as it closes its listeners; with
    /// one worker that is one line per reload). Until then, old workers may still accept new
    /// connections with the old configuration.
    pub fn reloads(&self) -> usize {
        self.error_log().matches("gracefully shutting down").count()
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn signal_group(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([
                    format!("-{signal}"),
                    "--".into(),
                    format!("-{}", child.id()),
                ])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the whole group: fast shutdown of master and every worker generation.
        self.signal_group("TERM");
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.child = Some(child);
            self.signal_group("KILL");
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
