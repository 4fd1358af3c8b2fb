//! An in-process batchd node, for tests where no process boundary is under test.
//!
//! The node is what `batchd serve` runs — the same flags parsed by the same CLI, the same
//! [`batchd::server::App`] (router, engine, store and blob store on the data directory) —
//! on a runtime of its own, so that it lives apart from the test's runtime as a child process
//! would: its tasks are its own, its log goes to its own file (each of its threads logs
//! through its own subscriber, not a process-wide one), and ending it ends them all.
//!
//! What a process has that this node shares with the test process: the environment (an
//! upstream's `api_key_env` is given from the test's environment pairs instead, see
//! [`InProcess::config`]) and the clock offset of [`batchd::clock`], which stays 0 on the
//! embedded store every in-process node runs on. Tests of a crash, a signal, a cluster of
//! nodes or the process's memory start the real binary (`Server::start`).

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use batchd::cli::{Cli, Command};
use batchd::config::Config;
use batchd::secret::Secret;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// How long a node may take to start, and to stop once asked.
const START: Duration = Duration::from_secs(60);
const STOP: Duration = Duration::from_secs(30);

/// A running in-process node.
pub struct InProcess {
    rt: Option<tokio::runtime::Runtime>,
    /// The thread that runs the app's own future (`App::build`, then `App::run`), as
    /// `batchd serve`'s main thread does; its tasks run on the runtime's workers.
    main: Option<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
    abandon: CancellationToken,
    ended: Receiver<anyhow::Result<()>>,
    /// `http://ADDR`, as the binary prints it.
    pub url: String,
}

impl InProcess {
    /// The node's configuration, read as `batchd serve --listen 127.0.0.1:0 --data-dir DATA
    /// --config CONFIG ARGS…` reads it, with `env` as the upstreams' key variables.
    pub fn config(data: &Path, config: &Path, args: &[String], env: &[(String, String)]) -> Config {
        let fixed = ["batchd", "serve", "--listen", "127.0.0.1:0", "--data-dir"].map(Into::into);
        let argv: Vec<std::ffi::OsString> =
            fixed.into_iter().chain([data.into(), "--config".into(), config.into()]).chain(args.iter().map(Into::into)).collect();
        let Command::Serve(serve) = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("serve flags: {e}")).command else {
            unreachable!("the command is serve")
        };
        let mut raw = serve.raw_config().unwrap_or_else(|e| panic!("config: {e:#}"));
        // The keys an upstream reads from its environment: the binary's child gets `env`;
        // here each is set on the resolved upstream, as `resolve` would from the variable.
        let mut keys = Vec::new();
        for u in &mut raw.upstreams {
            if let Some((var, key)) = u.api_key_env.as_ref().and_then(|var| env.iter().find(|(k, _)| k == var)) {
                keys.push((u.name.clone(), var.clone(), key.clone()));
                u.api_key_env = None;
            }
        }
        let mut cfg = raw.resolve().unwrap_or_else(|e| panic!("config: {e}"));
        for (name, var, key) in keys {
            let u = cfg.upstreams.iter_mut().find(|u| u.name == name).expect("a resolved upstream keeps its name");
            (u.api_key, u.api_key_env) = (Some(Secret::new(key)), Some(var));
        }
        cfg
    }

    /// Builds and starts the node on a runtime of its own; its log is appended to `log`.
    pub fn start(cfg: Config, log: &Path) -> InProcess {
        let dispatch = log_dispatch(log);
        let on_worker = dispatch.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("batchd-node")
            .enable_all()
            .on_thread_start(move || std::mem::forget(tracing::dispatcher::set_default(&on_worker)))
            .build()
            .expect("a runtime for the node");
        let (bound, listening) = std::sync::mpsc::channel();
        let (done, ended) = std::sync::mpsc::channel();
        let (stop, abandon) = (CancellationToken::new(), CancellationToken::new());
        let (stopped, abandoned) = (stop.clone(), abandon.clone());
        let handle = rt.handle().clone();
        let main = std::thread::Builder::new()
            .name("batchd-node-main".into())
            .spawn(move || {
                let _log = tracing::dispatcher::set_default(&dispatch);
                // Made on this thread: the app's future is not `Send` (nor needs to be).
                let serve = async move {
                    let app = match batchd::server::App::build(cfg).await {
                        Ok(app) => app,
                        Err(e) => return drop(bound.send(Err(e))),
                    };
                    let _ = bound.send(Ok(app.local_addr()));
                    let _ = done.send(app.run(async move { stopped.cancelled().await }).await);
                };
                handle.block_on(async move {
                    tokio::select! {
                        () = serve => {}
                        () = abandoned.cancelled() => {}
                    }
                });
            })
            .expect("a thread for the node");
        let addr = match listening.recv_timeout(START) {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("batchd did not start: {e:#}"),
            Err(_) => panic!("batchd did not start within {START:?}"),
        };
        InProcess { rt: Some(rt), main: Some(main), stop, abandon, ended, url: format!("http://{addr}") }
    }

    /// Stops the node as SIGTERM does (graceful: in-flight calls get their grace, results
    /// are made durable, leases released); returns whether it stopped cleanly.
    pub fn stop(mut self) -> bool {
        self.stop.cancel();
        let clean = match self.ended.recv_timeout(STOP) {
            Ok(r) => r.is_ok(),
            Err(RecvTimeoutError::Timeout) => panic!("batchd did not stop within {STOP:?}"),
            Err(RecvTimeoutError::Disconnected) => false,
        };
        self.abandon();
        clean
    }

    /// Ends the node without waiting for what it is doing: its own future is dropped (the
    /// listener closes), and every task ends at its next await, dropped on its own threads.
    fn abandon(&mut self) {
        self.abandon.cancel();
        if let Some(main) = self.main.take() {
            let _ = main.join();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// A subscriber writing what the binary writes to its stderr with `BATCHD_LOG=batchd=debug`.
fn log_dispatch(path: &Path) -> tracing::Dispatch {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("batchd=debug"))
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .finish();
    tracing::Dispatch::new(subscriber)
}
