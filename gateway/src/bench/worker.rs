//! Fleets in child processes, driven over stdin/stdout with one JSON line per command and reply.
//!
//! One process may hold at most 20,000 open files here and one source address reaches about
//! 28k ports towards one destination, so the orchestrator spreads devices over several worker
//! processes, each binding its own `127.0.0.x` source address. [`FleetClient`] hides whether a
//! fleet is local (smoke tests) or such a process.

use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::bench::BenchError;
use crate::bench::fleet::{Command, Fleet, FleetConfig, Reply};

/// Serves a fleet on stdin/stdout until `quit` or end of input (the orchestrator died).
pub async fn serve_stdio(config: FleetConfig) -> Result<(), BenchError> {
    let mut fleet = Fleet::new(config);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Command>(&line) {
            Ok(Command::Quit) => {
                let _ = fleet.handle(Command::Quit).await;
                write_line(&mut out, &Reply::Bye).await?;
                return Ok(());
            }
            Ok(cmd) => fleet.handle(cmd).await,
            Err(e) => Reply::Error {
                message: format!("bad command {line:?}: {e}"),
            },
        };
        write_line(&mut out, &reply).await?;
    }
    let _ = fleet.handle(Command::Quit).await;
    Ok(())
}

async fn write_line(out: &mut tokio::io::Stdout, reply: &Reply) -> Result<(), BenchError> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    out.write_all(&line).await?;
    out.flush().await?;
    Ok(())
}

/// A fleet worker running as a child process.
pub struct WorkerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl WorkerProcess {
    /// Starts `exe worker --config <json>`; the child dies with this handle.
    pub fn spawn(exe: &Path, config: &FleetConfig) -> Result<Self, BenchError> {
        let mut child = tokio::process::Command::new(exe)
            .arg("worker")
            .arg("--fleet")
            .arg(serde_json::to_string(config)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| BenchError::Setup("worker stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Setup("worker stdout".into()))?;
        Ok(WorkerProcess {
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        })
    }

    /// The child's pid (for resource readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn call(&mut self, command: &Command) -> Result<Reply, BenchError> {
        let mut line = serde_json::to_vec(command)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        match self.stdout.next_line().await? {
            Some(line) => Ok(serde_json::from_str(&line)?),
            None => Err(BenchError::Worker("worker process exited".into())),
        }
    }
}

/// A fleet the orchestrator drives, in this process or in a child.
pub enum FleetClient {
    /// In this process.
    Local(Box<Fleet>),
    /// In a child process.
    Process(Box<WorkerProcess>),
}

impl FleetClient {
    /// Sends one command and waits for its reply; an `Error` reply becomes `Err`.
    pub async fn call(&mut self, command: Command) -> Result<Reply, BenchError> {
        let reply = match self {
            FleetClient::Local(fleet) => fleet.handle(command).await,
            FleetClient::Process(p) => p.call(&command).await?,
        };
        match reply {
            Reply::Error { message } => Err(BenchError::Worker(message)),
            other => Ok(other),
        }
    }
}

/// Sends the same command to every fleet at once and collects the replies in order.
pub async fn broadcast(
    fleets: &mut [FleetClient],
    command: Command,
) -> Result<Vec<Reply>, BenchError> {
    let calls = fleets.iter_mut().map(|f| f.call(command.clone()));
    futures::future::join_all(calls).await.into_iter().collect()
}
