//! `gpufleet`: the command line of the fleet.
//!
//! Exit codes: 0 when the job (or command) succeeded; 1 when a job failed;
//! 2 for a usage, input or connection error; 3 when the job was cancelled;
//! 130 when Ctrl-C stopped the waiting and left the job running.
//!
//! Modules: `client` speaks the API and reads the events stream,
//! `jobfile` reads job files and builds one-off jobs, `watch` waits on a
//! job (bars, logs, Ctrl-C), `show` draws tables, `up` runs a local fleet,
//! `dashboard` serves the web page, `settings` loads the command line's
//! own configuration.

mod auth;
mod client;
mod dashboard;
mod jobfile;
mod settings;
mod show;
mod up;
mod watch;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gpufleet_natsutil::artifacts::Stored;
use gpufleet_natsutil::events::Until;
use gpufleet_natsutil::telemetry::{self, LogFormat};
use gpufleet_schema::TaskState;
use gpufleet_schema::{subjects, EventKind, JobId, JobSpec, JobState, JobStatus, TaskId};
use serde::Serialize;

use client::Api;
use watch::{CtrlC, WaitOptions, Waited};

/// Process exit codes.
pub mod exit {
    pub const OK: i32 = 0;
    /// The job ended in `FINISHED:EXECUTION_EXCEPTION` or `FAILED_TO_RUN`.
    pub const FAILED: i32 = 1;
    /// Bad usage or input, or NATS / the coordinator could not be reached.
    pub const USAGE: i32 = 2;
    /// The job was cancelled (`FINISHED:ABORTED`).
    pub const CANCELLED: i32 = 3;
    /// Ctrl-C ended the waiting; the job was left running.
    pub const INTERRUPTED: i32 = 130;

    /// The code that mirrors a job's outcome.
    pub fn of(status: gpufleet_schema::JobState) -> i32 {
        use gpufleet_schema::JobState;
        match status {
            JobState::Completed => OK,
            JobState::Aborted => CANCELLED,
            _ => FAILED,
        }
    }
}

#[derive(Parser)]
#[command(
    name = "gpufleet",
    version,
    about = "Run batch work on a fleet of GPU machines over NATS",
    after_help = "Exit codes: 0 completed, 1 failed, 2 usage or connection error, 3 cancelled, \
                  130 interrupted (job left running).\n\
                  Start a local fleet with `gpufleet up`, then e.g. `gpufleet run -- echo hello`."
)]
struct Cli {
    /// NATS server URL(s), comma-separated [env: GPUFLEET_NATS_URL] [default: nats://127.0.0.1:4222]
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// NATS credentials file (JWT + NKey seed) [env: GPUFLEET_NATS_CREDS]
    #[arg(long, global = true)]
    nats_creds: Option<PathBuf>,
    /// TOML settings file (keys: nats_url, nats_creds, nats_token, connect_timeout, log_format)
    #[arg(long, global = true, env = "GPUFLEET_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON for scripts instead of tables
    #[arg(long, global = true)]
    json: bool,
    /// Warnings on stderr as `text` or `json` lines (`up` passes it on) [env: GPUFLEET_LOG_FORMAT]
    #[arg(long, global = true, value_name = "text|json")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone, Default)]
struct WaitFlags {
    /// Wait for the job to finish, showing progress; the exit code mirrors the outcome
    #[arg(long, short)]
    wait: bool,
    /// Stream the job's output and progress events while waiting (implies --wait)
    #[arg(long, short)]
    follow: bool,
    /// On Ctrl-C leave the job running instead of asking whether to cancel it
    #[arg(long)]
    detach: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Whole GPUs
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// Free GPU memory needed on each GPU, e.g. 20GiB (with --gpus 0: a share of one GPU)
    #[arg(long)]
    gpu_memory: Option<String>,
    /// Logical CPUs, fractions allowed [default: 1]
    #[arg(long)]
    cpus: Option<f64>,
    /// Host memory limit, e.g. 8GiB
    #[arg(long)]
    memory: Option<String>,
    /// Stop the task after this long, e.g. 90s or 2h
    #[arg(long)]
    timeout: Option<String>,
    /// Name of the job and its task [default: the command]
    #[arg(long)]
    name: Option<String>,
    /// NAME=VALUE for the task's environment, repeatable
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Glob of output files to upload, repeatable
    #[arg(long = "artifact", value_name = "GLOB")]
    artifacts: Vec<String>,
    /// Retries after LOST or INTERRUPTED [default: 2]
    #[arg(long)]
    max_retries: Option<u32>,
    /// Higher runs first
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Only on workers with this label, KEY=VALUE, repeatable
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Only on this worker, repeatable
    #[arg(long = "worker", value_name = "NAME")]
    workers: Vec<String>,
    /// A sweep: NAME=V1,V2,... runs one task per combination of the values given
    /// (repeatable); each task finds them in its environment and {NAME} in the command
    /// is replaced by the value, {index} by GPUFLEET_ARRAY_INDEX
    #[arg(long = "array", value_name = "NAME=V1,V2,...")]
    array: Vec<String>,
    /// The most of the job's tasks that run at once
    #[arg(long)]
    max_parallel: Option<u32>,
    /// Start only after this job completed; if it ends otherwise, so does this one
    /// (repeatable)
    #[arg(long = "after-ok", value_name = "JOB")]
    after_ok: Vec<String>,
    /// Start only after this job finished, however it ended (repeatable)
    #[arg(long = "after-any", value_name = "JOB")]
    after_any: Vec<String>,
    /// Its task may be stopped (SIGTERM, a grace, then SIGKILL) for waiting
    /// work of a higher priority, and run again later
    #[arg(long)]
    preemptible: bool,
    /// Submit, print the job id and return at once
    #[arg(long, conflicts_with_all = ["wait", "follow"])]
    no_wait: bool,
    // `--wait` and `--follow` are what `run` does anyway; taken so that a
    // hand used to `submit` is not refused.
    #[command(flatten)]
    wait: WaitFlags,
    /// The command and its arguments, after --
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a job file (JSON or TOML; - for stdin) and print its id
    Submit {
        /// The job file; `-` reads it from stdin
        file: String,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// Run one command as a one-task job, waiting for it and streaming its output
    /// (`--wait` and `--follow` are the default; `--no-wait` only submits)
    Run(Box<RunArgs>),
    /// Show a job and its tasks
    Status {
        job: String,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// List jobs, newest first
    List {
        /// Only jobs in this status, e.g. RUNNING or FINISHED:COMPLETED
        #[arg(long)]
        status: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a job: its tasks stop and the job ends FINISHED:ABORTED; with
    /// TASK (an id or name), only that task stops (CANCELLED) and the rest
    /// of the job goes on
    Cancel {
        job: String,
        task: Option<String>,
        /// Wait until its tasks have stopped (a whole job's only)
        #[arg(long, short, conflicts_with = "task")]
        wait: bool,
    },
    /// Run a job's tasks that ended without succeeding again (with TASK,
    /// that one), each as a new attempt with its retries whole again; a
    /// finished job is reopened
    Retry {
        job: String,
        task: Option<String>,
        /// Wait for the job to end, as `status --wait`
        #[arg(long, short)]
        wait: bool,
    },
    /// Delete a finished job: its record and its events (an unfinished one
    /// must be cancelled first)
    Delete { job: String },
    /// Send a message to a job's running tasks (to one with TASK): a JSON line
    /// in each one's inbox file ($GPUFLEET_INBOX); prints how many got it
    Send {
        job: String,
        /// [TASK] DATA: a task id or name, then the data: JSON (anything else
        /// is sent as a JSON string), or @FILE to read it from a file
        #[arg(required = true, num_args = 1..=2, value_name = "[TASK] DATA")]
        args: Vec<String>,
        /// The message's topic, e.g. log_level
        #[arg(long)]
        topic: String,
        /// Also send the task SIGUSR1 (only to a task that handles it: by
        /// default it ends a process)
        #[arg(long)]
        signal: bool,
    },
    /// List a job's errors: every attempt that failed, was interrupted, lost
    /// or timed out since the last reset
    Errors {
        job: String,
        /// Clear them (after listing them)
        #[arg(long)]
        reset: bool,
    },
    /// Print a job's output so far (one task's with TASK)
    Logs {
        job: String,
        /// A task id or name
        task: Option<String>,
        /// Keep printing until the job finishes
        #[arg(long, short)]
        follow: bool,
    },
    /// List workers, their GPUs and which task holds each
    Workers,
    /// Task artifacts: list a job's, download one
    Artifacts {
        #[command(subcommand)]
        command: ArtifactsCmd,
    },
    /// Start a local fleet: nats-server, a coordinator and workers; Ctrl-C stops it all
    Up(up::UpArgs),
    /// Write keys, settings and a nats-server configuration for a fleet with roles
    Auth(auth::AuthArgs),
    /// Serve a live web page of the fleet and your jobs (logs, cancel), as your NATS user
    Dashboard {
        /// Where to serve it. It acts with your NATS credentials: keep it on loopback
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum ArtifactsCmd {
    /// List a job's artifacts
    List { job: String },
    /// Download one artifact of a task (its newest attempt that uploaded it)
    Get {
        job: String,
        /// A task id or name
        task: String,
        /// The file's path in the task's output directory, e.g. out/model.pt
        name: String,
        /// Where to write it; `-` for stdout [default: its file name, here]
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// A message's data from the command line: JSON, `@FILE` for a file's
/// JSON, or else the text as a JSON string (`DEBUG` is `"DEBUG"`).
fn message_data(arg: &str) -> anyhow::Result<serde_json::Value> {
    if let Some(path) = arg.strip_prefix('@') {
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("DATA: {path}: {e}"))?;
        return serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("DATA: {path} is not JSON: {e}"));
    }
    Ok(serde_json::from_str(arg).unwrap_or_else(|_| serde_json::Value::String(arg.into())))
}

fn job_id(s: &str) -> anyhow::Result<JobId> {
    JobId::new(s).map_err(|e| anyhow::anyhow!("{e}"))
}

/// An error and its causes on one line, without the repeats that arise
/// when a message already quotes its source.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if out.contains(&c) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&c);
    }
    out
}

fn main() {
    // Die quietly of a closed pipe (`gpufleet logs JOB | head`), as Unix
    // tools do, instead of panicking on the next print.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            exit::USAGE
        }
    };
    // A prompt abandoned by a second Ctrl-C may still block a thread on
    // stdin; do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(200));
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.json;
    let cfg = settings::load(
        cli.config.as_deref(),
        cli.nats_url.clone(),
        cli.nats_creds.clone(),
        cli.log_format,
    )?;
    // What it says to people goes to stderr too: only warnings are logged.
    telemetry::init_with_default(cfg.log_format, "warn");
    let auth = cfg.auth();
    let connect = || async {
        let mut api = Api::connect(
            &cfg.nats_url,
            &auth,
            cfg.user.clone(),
            cfg.connect_timeout.0,
        )
        .await?;
        api.request_timeout = cfg.request_timeout.0;
        anyhow::Ok(api)
    };
    let patience = cfg.submit_patience.0;
    match cli.command {
        Cmd::Up(args) => up::run(args, json, cli.log_format).await,
        Cmd::Auth(args) => auth::run(&args, cfg.nats_url.clone()),
        Cmd::Submit { file, wait } => {
            // Read and check the job before touching the network.
            let spec = jobfile::read(&file)?;
            submit(&connect().await?, spec, patience, &wait, json).await
        }
        Cmd::Run(r) => {
            let r = *r;
            let spec = jobfile::one_off(jobfile::OneOff {
                command: r.command,
                name: r.name,
                gpus: r.gpus,
                gpu_memory: r.gpu_memory,
                cpus: r.cpus,
                memory: r.memory,
                timeout: r.timeout,
                env: r.env,
                artifacts: r.artifacts,
                max_retries: r.max_retries,
                priority: r.priority,
                labels: r.labels,
                workers: r.workers,
                array: r.array,
                max_parallel: r.max_parallel,
                after_ok: r.after_ok,
                after_any: r.after_any,
                preemptible: r.preemptible,
            })?;
            let wait = WaitFlags {
                wait: !r.no_wait,
                follow: !r.no_wait,
                detach: r.wait.detach,
            };
            submit(&connect().await?, spec, patience, &wait, json).await
        }
        Cmd::Status { job, wait } => {
            let id = job_id(&job)?;
            let api = connect().await?;
            if wait.wait || wait.follow {
                return wait_job(&api, &id, &wait, json).await;
            }
            let s = api.get(&id).await?;
            if json {
                print_json(&s);
            } else {
                println!("{}", show::job(&s));
            }
            Ok(exit::OK)
        }
        Cmd::List { status, limit } => {
            let status: Option<JobState> = match status {
                Some(s) => Some(s.parse().map_err(|e| anyhow::anyhow!("--status: {e}"))?),
                None => None,
            };
            let list = connect().await?.list(status, Some(limit)).await?;
            if json {
                print_json(&list);
            } else {
                println!("{}", show::jobs(&list));
            }
            Ok(exit::OK)
        }
        Cmd::Retry { job, task, wait } => {
            let id = job_id(&job)?;
            let api = connect().await?;
            let s = api.retry(&id, task).await?;
            if wait {
                let flags = WaitFlags {
                    wait: true,
                    ..Default::default()
                };
                return wait_job(&api, &id, &flags, json).await;
            }
            if json {
                print_json(&s);
            } else {
                let waiting = s.counts.queued;
                println!(
                    "job {id} is {} again: {waiting} task{} to run",
                    s.status,
                    if waiting == 1 { "" } else { "s" }
                );
            }
            Ok(exit::OK)
        }
        Cmd::Cancel {
            job,
            task: Some(task),
            wait: _,
        } => {
            let id = job_id(&job)?;
            let s = connect()
                .await?
                .cancel_task(&id, Some(task.clone()))
                .await?;
            if json {
                print_json(&s);
            } else {
                let t = s
                    .tasks
                    .iter()
                    .find(|t| t.name == task || t.task_id.as_str() == task);
                match t {
                    Some(t) if t.state.is_end() => println!("task {task} of job {id}: {}", t.state),
                    _ => println!("cancelling task {task} of job {id}"),
                }
            }
            Ok(exit::OK)
        }
        Cmd::Cancel {
            job,
            task: None,
            wait,
        } => {
            let id = job_id(&job)?;
            let api = connect().await?;
            let s = api.cancel(&id).await?;
            if wait && !s.status.is_finished() {
                let flags = WaitFlags {
                    wait: true,
                    detach: true,
                    ..Default::default()
                };
                if !json {
                    eprintln!("cancelling job {id}; waiting for its tasks to stop");
                }
                return wait_job(&api, &id, &flags, json).await;
            }
            if json {
                print_json(&s);
            } else if s.status == JobState::Aborted {
                println!("cancelled job {id}");
            } else if s.status.is_finished() {
                println!("job {id} had already finished: {}", s.status);
            } else {
                let stopping = s.counts.running + s.counts.reserved;
                println!(
                    "cancelling job {id}: stopping {stopping} running task{} (`gpufleet status {id} --wait` waits for them)",
                    if stopping == 1 { "" } else { "s" }
                );
            }
            Ok(exit::OK)
        }
        Cmd::Delete { job } => {
            let id = job_id(&job)?;
            let s = connect().await?.delete(&id).await?;
            if json {
                print_json(&s);
            } else {
                println!("deleted job {id} ({})", s.status);
            }
            Ok(exit::OK)
        }
        Cmd::Send {
            job,
            mut args,
            topic,
            signal,
        } => {
            let id = job_id(&job)?;
            let data = message_data(&args.pop().expect("clap requires DATA"))?;
            let req = gpufleet_schema::message::SendRequest {
                job_id: id.clone(),
                task: args.pop(),
                topic,
                data,
                signal,
            };
            gpufleet_schema::message::check(&req.topic, &req.data)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let r = connect().await?.send(&req).await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "delivered to {} running task{} of job {id}",
                    r.delivered,
                    if r.delivered == 1 { "" } else { "s" }
                );
            }
            Ok(exit::OK)
        }
        Cmd::Errors { job, reset } => {
            let id = job_id(&job)?;
            let r = connect().await?.errors(&id, reset).await?;
            if json {
                print_json(&r);
            } else {
                println!("{}", show::errors(&r));
            }
            Ok(exit::OK)
        }
        Cmd::Logs { job, task, follow } => {
            let id = job_id(&job)?;
            logs(&connect().await?, &id, task.as_deref(), follow, json).await
        }
        Cmd::Workers => {
            let api = connect().await?;
            let list = api.workers().await?;
            let holders = show::gpu_holders(&list);
            if json {
                print_json(&show::workers_json(&list, &holders));
            } else {
                println!("{}", show::workers(&list, &holders));
            }
            Ok(exit::OK)
        }
        Cmd::Artifacts { command } => artifacts(&connect().await?, command, json).await,
        Cmd::Dashboard { listen } => {
            let api = connect().await?;
            dashboard::run(api, &cfg.nats_url, listen, telemetry::shutdown_signal()).await?;
            Ok(exit::OK)
        }
    }
}

/// What to show while waiting, from the flags and where output goes.
fn view(flags: &WaitFlags, json: bool) -> WaitOptions {
    let bars = !json && std::io::stderr().is_terminal();
    WaitOptions {
        follow: flags.follow,
        states: !bars,
        progress: true,
        bars,
        ctrl_c: if flags.detach {
            CtrlC::Detach
        } else {
            CtrlC::Ask
        },
        json,
        task: None,
    }
}

async fn submit(
    api: &Api,
    spec: JobSpec,
    patience: std::time::Duration,
    flags: &WaitFlags,
    json: bool,
) -> anyhow::Result<i32> {
    let reply = api.submit(&spec, patience).await?;
    if !flags.wait && !flags.follow {
        if json {
            print_json(&reply);
        } else {
            println!("{}", reply.job_id);
        }
        return Ok(exit::OK);
    }
    if !json {
        let again = if reply.created {
            ""
        } else {
            " (it already existed)"
        };
        eprintln!("submitted job {}{again}", reply.job_id);
    }
    wait_job(api, &reply.job_id, flags, json).await
}

async fn wait_job(api: &Api, job: &JobId, flags: &WaitFlags, json: bool) -> anyhow::Result<i32> {
    let opts = view(flags, json);
    match watch::wait(api, job, &opts).await? {
        Waited::Detached => Ok(exit::INTERRUPTED),
        Waited::Finished(status) => {
            if json && opts.follow {
                // The last line of the JSON-lines stream.
                println!("{}", serde_json::to_string(&status)?);
            } else if json {
                print_json(&status);
            } else {
                eprintln!("{}", summary(&status));
            }
            Ok(exit::of(status.status))
        }
    }
}

/// After waiting: one line for a one-task job, the table otherwise.
fn summary(s: &JobStatus) -> String {
    let [t] = s.tasks.as_slice() else {
        return format!("\n{}", show::job(s));
    };
    let mut line = format!("job {} {}: {} {}", s.job_id, s.status, t.name, t.state);
    if let Some(w) = &t.worker {
        line.push_str(&format!(" on {w}"));
    }
    if !t.gpus.is_empty() {
        line.push_str(&format!(" (GPUs {})", t.gpus.join(",")));
    }
    if let (Some(a), Some(b)) = (t.started_at, t.finished_at) {
        line.push_str(&format!(" in {}", show::span((b - a).whole_seconds())));
    }
    if let Some(c) = t.exit_code {
        line.push_str(&format!(", exit {c}"));
    }
    if let Some(r) = &t.result {
        line.push_str(&format!("\nresult: {r}"));
    } else if let Some(r) = t.reason.as_ref().or(s.reason.as_ref()) {
        let said = t.exit_code.is_some() && r.starts_with("exited with code");
        if t.state != TaskState::Succeeded && !said {
            line.push_str(&format!("\nreason: {r}"));
        }
    }
    line
}

/// A task of `status` by id or name.
fn find_task(status: &JobStatus, task: &str) -> anyhow::Result<TaskId> {
    status
        .tasks
        .iter()
        .find(|t| t.task_id.as_str() == task || t.name == task)
        .map(|t| t.task_id.clone())
        .with_context(|| {
            let names: Vec<&str> = status
                .tasks
                .iter()
                .map(|t| t.name.as_str())
                .take(10)
                .collect();
            format!(
                "job {} has no task {task:?} (its tasks: {}{})",
                status.job_id,
                names.join(", "),
                if status.tasks.len() > 10 { ", …" } else { "" }
            )
        })
}

async fn logs(
    api: &Api,
    job: &JobId,
    task: Option<&str>,
    follow: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let status = api.get(job).await?;
    let task = task.map(|t| find_task(&status, t)).transpose()?;
    let opts = WaitOptions {
        follow: true,
        ctrl_c: CtrlC::Quit,
        json,
        task,
        ..Default::default()
    };
    if !follow {
        watch::print_stored(api, job, &opts).await?;
        return Ok(exit::OK);
    }
    match watch::wait(api, job, &opts).await? {
        Waited::Finished(_) => Ok(exit::OK),
        Waited::Detached => Ok(exit::INTERRUPTED),
    }
}

async fn artifacts(api: &Api, command: ArtifactsCmd, json: bool) -> anyhow::Result<i32> {
    let js = async_nats::jetstream::new(api.client.clone());
    let job = match &command {
        ArtifactsCmd::List { job } | ArtifactsCmd::Get { job, .. } => job_id(job)?,
    };
    let status = api.get(&job).await?;
    // Only what the worker holding each attempt uploaded counts: the
    // coordinator's state events say who that was.
    let mut states = api
        .events(
            subjects::job_events_of_kind(&status.owner, &job, EventKind::State),
            Until::CaughtUp,
        )
        .await?;
    while states.next().await.is_some() {}
    let holders = states.holders();
    let stored: Vec<Stored> = gpufleet_natsutil::artifacts::list(&js, &status.owner, &job)
        .await
        .context("reading the artifacts stream")?
        .into_iter()
        .filter(|a| holders.holder(&a.at.task, a.at.attempt) == Some(&a.at.worker))
        .collect();
    let task_name = |task: &TaskId| {
        status
            .tasks
            .iter()
            .find(|t| &t.task_id == task)
            .map(|t| t.name.clone())
            .unwrap_or_else(|| task.to_string())
    };
    match command {
        ArtifactsCmd::List { .. } => {
            if json {
                print_json(
                    &stored
                        .iter()
                        .map(|a| {
                            serde_json::json!({"task": task_name(&a.at.task), "attempt": a.at.attempt,
                                "name": a.meta.name, "worker": a.at.worker,
                                "object": subjects::artifact_object(&job, &a.at.task, a.at.attempt, &a.meta.name),
                                "size": a.meta.size.0, "sha256": a.meta.sha256})
                        })
                        .collect::<Vec<_>>(),
                );
            } else if stored.is_empty() {
                println!("job {job} has no artifacts");
            } else {
                let table: Vec<Vec<String>> = stored
                    .iter()
                    .map(|a| {
                        vec![
                            task_name(&a.at.task),
                            a.at.attempt.to_string(),
                            a.meta.name.clone(),
                            show::size(a.meta.size.0),
                        ]
                    })
                    .collect();
                println!("{}", show::table(&["TASK", "TRY", "NAME", "SIZE"], &table));
            }
            Ok(exit::OK)
        }
        ArtifactsCmd::Get {
            task, name, output, ..
        } => {
            let task_id = find_task(&status, &task)?;
            // The newest attempt that uploaded it.
            let artifact = stored
                .iter()
                .filter(|a| a.at.task == task_id && a.meta.name == name)
                .max_by_key(|a| a.at.attempt)
                .with_context(|| {
                    format!("task {task} of job {job} uploaded no {name:?} (see `gpufleet artifacts list {job}`)")
                })?;
            let object =
                subjects::artifact_object(&job, &task_id, artifact.at.attempt, &artifact.meta.name);
            let (n, path) = if output.as_deref() == Some(std::path::Path::new("-")) {
                let mut out = tokio::io::stdout();
                let n = gpufleet_natsutil::artifacts::download(&js, artifact, &mut out).await?;
                (n, "-".to_string())
            } else {
                let path = output.unwrap_or_else(|| {
                    PathBuf::from(std::path::Path::new(&name).file_name().unwrap_or_default())
                });
                let mut file = tokio::fs::File::create(&path)
                    .await
                    .with_context(|| format!("creating {}", path.display()))?;
                let n = gpufleet_natsutil::artifacts::download(&js, artifact, &mut file).await?;
                (n, path.display().to_string())
            };
            if path == "-" {
                // The bytes were the output.
            } else if json {
                print_json(&serde_json::json!({"object": object, "path": path, "size": n}));
            } else {
                eprintln!("wrote {path} ({}) from {object}", show::size(n));
            }
            Ok(exit::OK)
        }
    }
}
