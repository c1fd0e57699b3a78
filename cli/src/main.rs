//! `gpufleet`: the command line of the fleet.
//!
//! Exit codes: 0 when the job (or command) succeeded; 1 when a job failed;
//! 3 when it was cancelled; 2 for a usage or connection error.

mod client;
mod jobfile;
mod show;
mod up;
mod watch;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gpufleet_schema::{codec, subjects, JobId, JobState, Lease};
use serde::Serialize;

use client::Api;
use watch::{WaitOptions, Waited};

#[derive(Parser)]
#[command(
    name = "gpufleet",
    version,
    about = "Run batch work on a fleet of GPU machines over NATS"
)]
struct Cli {
    /// NATS server URL(s), comma-separated
    #[arg(
        long,
        global = true,
        env = "GPUFLEET_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// Print JSON for scripts instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
struct WaitFlags {
    /// Wait for the job to finish, showing progress; the exit code mirrors the outcome
    #[arg(long, short)]
    wait: bool,
    /// Stream the job's output (implies --wait)
    #[arg(long, short)]
    follow: bool,
    /// On Ctrl-C leave the job running instead of asking whether to cancel it
    #[arg(long)]
    detach: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a job file (JSON or TOML; - for stdin)
    Submit {
        file: String,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// Run one command as a one-task job and follow it
    Run {
        /// Whole GPUs
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        /// Free GPU memory needed, e.g. 20GiB (with --gpus 0: a share of one GPU)
        #[arg(long)]
        gpu_memory: Option<String>,
        #[arg(long)]
        cpus: Option<f64>,
        /// Host memory, e.g. 8GiB
        #[arg(long)]
        memory: Option<String>,
        /// e.g. 2h
        #[arg(long)]
        timeout: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// NAME=VALUE, repeatable
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Globs of output files to upload, repeatable
        #[arg(long = "artifact")]
        artifacts: Vec<String>,
        #[arg(long)]
        max_retries: Option<u32>,
        /// Submit and return at once
        #[arg(long)]
        no_wait: bool,
        /// On Ctrl-C leave the job running instead of asking
        #[arg(long)]
        detach: bool,
        /// The command and its arguments, after --
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
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
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a job: its tasks stop and the job ends FINISHED:ABORTED
    Cancel { job: String },
    /// Print a job's output (one task's with TASK)
    Logs {
        job: String,
        /// A task id or name
        task: Option<String>,
        /// Keep printing until the job finishes
        #[arg(long, short)]
        follow: bool,
    },
    /// List workers and their GPUs
    Workers,
    /// Task artifacts in the object store
    Artifacts {
        #[command(subcommand)]
        command: ArtifactsCmd,
    },
    /// Start a local fleet: nats-server, a coordinator and workers
    Up {
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Simulated GPUs per worker, COUNTxMEMORY[:MODEL]; "" for none
        #[arg(long, default_value = "2x24GiB:Simulated")]
        simulate_gpus: String,
        /// NATS port (another free one if taken)
        #[arg(long, default_value_t = 4222)]
        port: u16,
        /// Keep NATS data here instead of a temporary folder
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The nats-server binary (default: NATS_SERVER_BIN, scripts/nats-server.sh, PATH)
        #[arg(long)]
        nats_server: Option<PathBuf>,
        /// Submit this job file once the fleet is up and follow it
        #[arg(long)]
        run: Option<String>,
        /// With --run: stop the fleet when the job ends and exit with its outcome
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand)]
enum ArtifactsCmd {
    /// List a job's artifacts
    List { job: String },
    /// Download one artifact
    Get {
        job: String,
        task: String,
        name: String,
        /// Where to write it (default: its file name here)
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn job_id(s: &str) -> anyhow::Result<JobId> {
    JobId::new(s).map_err(|e| anyhow::anyhow!("{e}"))
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    drop(runtime);
    std::process::exit(code);
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.json;
    match cli.command {
        Cmd::Up {
            workers,
            simulate_gpus,
            port,
            data_dir,
            nats_server,
            run,
            once,
        } => {
            let opts = up::UpOptions {
                workers,
                simulate_gpus,
                port,
                data_dir,
                nats_server,
            };
            let mut fleet = up::up(&opts).await?;
            let mut code = 0;
            if let Some(file) = run {
                let api = Api::connect(&fleet.url).await?;
                let spec = jobfile::read(&file)?;
                code = submit_and_wait(&api, spec, true, true, false, json).await?;
                if once {
                    fleet.stop();
                    return Ok(code);
                }
            }
            eprintln!("press Ctrl-C to stop the fleet");
            tokio::signal::ctrl_c().await?;
            eprintln!("stopping the fleet...");
            fleet.stop();
            Ok(code)
        }
        command => {
            let api = Api::connect(&cli.nats_url).await?;
            run_command(&api, command, json).await
        }
    }
}

async fn submit_and_wait(
    api: &Api,
    spec: gpufleet_schema::JobSpec,
    wait: bool,
    follow: bool,
    detach: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let reply = api.submit(&spec).await?;
    if !wait && !follow {
        if json {
            print_json(&reply);
        } else {
            println!("{}", reply.job_id);
        }
        return Ok(0);
    }
    eprintln!("submitted job {}", reply.job_id);
    wait_job(api, &reply.job_id, follow, detach, json).await
}

async fn wait_job(
    api: &Api,
    job: &JobId,
    follow: bool,
    detach: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let opts = WaitOptions {
        follow,
        detach,
        progress: !json,
    };
    match watch::wait(api, job, &opts).await? {
        Waited::Detached => Ok(0),
        Waited::Finished(status) => {
            if json {
                print_json(&status);
            } else {
                eprintln!("{}", show::job(&status));
            }
            Ok(watch::exit_code(status.status))
        }
    }
}

async fn run_command(api: &Api, command: Cmd, json: bool) -> anyhow::Result<i32> {
    match command {
        Cmd::Submit { file, wait } => {
            let spec = jobfile::read(&file)?;
            submit_and_wait(api, spec, wait.wait, wait.follow, wait.detach, json).await
        }
        Cmd::Run {
            gpus,
            gpu_memory,
            cpus,
            memory,
            timeout,
            name,
            env,
            artifacts,
            max_retries,
            no_wait,
            detach,
            command,
        } => {
            let spec = jobfile::one_off(jobfile::OneOff {
                command,
                name,
                gpus,
                gpu_memory,
                cpus,
                memory,
                timeout,
                env,
                artifacts,
                max_retries,
            })?;
            submit_and_wait(api, spec, !no_wait, !no_wait, detach, json).await
        }
        Cmd::Status { job, wait } => {
            let id = job_id(&job)?;
            if wait.wait || wait.follow {
                return wait_job(api, &id, wait.follow, wait.detach, json).await;
            }
            let s = api.get(&id).await?;
            if json {
                print_json(&s);
            } else {
                println!("{}", show::job(&s));
            }
            Ok(0)
        }
        Cmd::List { status, limit } => {
            let status: Option<JobState> = match status {
                Some(s) => Some(s.parse().map_err(anyhow::Error::msg)?),
                None => None,
            };
            let list = api.list(status, Some(limit)).await?;
            if json {
                print_json(&list);
            } else {
                println!("{}", show::jobs(&list));
            }
            Ok(0)
        }
        Cmd::Cancel { job } => {
            let s = api.cancel(&job_id(&job)?).await?;
            if json {
                print_json(&s);
            } else {
                println!("cancelling job {}: {}", s.job_id, s.status);
            }
            Ok(0)
        }
        Cmd::Logs { job, task, follow } => logs(api, &job_id(&job)?, task.as_deref(), follow).await,
        Cmd::Workers => {
            let list = api.workers().await?;
            if json {
                print_json(&list);
            } else {
                let holders = gpu_holders(api).await.unwrap_or_default();
                println!("{}", show::workers(&list, &holders));
            }
            Ok(0)
        }
        Cmd::Artifacts { command } => artifacts(api, command, json).await,
        Cmd::Up { .. } => unreachable!("handled before connecting"),
    }
}

/// Which tasks hold each GPU, from the live leases.
async fn gpu_holders(api: &Api) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let js = async_nats::jetstream::new(api.client.clone());
    let kv = gpufleet_natsutil::RawKv::open(&js, subjects::LEASES_BUCKET).await?;
    let mut watch = kv.watch(">").await?;
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    while let Some(Ok(ev)) = watch.next().await {
        match ev {
            gpufleet_natsutil::KvEvent::Synced => break,
            gpufleet_natsutil::KvEvent::Change(c) if c.op == gpufleet_natsutil::KvOp::Put => {
                if let Ok(l) = codec::decode::<Lease>(&c.value) {
                    for g in &l.grant.gpus {
                        out.entry(g.uuid.clone())
                            .or_default()
                            .push(l.task_id.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

async fn logs(api: &Api, job: &JobId, task: Option<&str>, follow: bool) -> anyhow::Result<i32> {
    let status = api.get(job).await?;
    let wanted: Option<String> = match task {
        None => None,
        Some(t) => Some(
            status
                .tasks
                .iter()
                .find(|x| x.task_id.as_str() == t || x.name == t)
                .map(|x| x.task_id.to_string())
                .with_context(|| format!("job {job} has no task {t:?}"))?,
        ),
    };
    let multi = wanted.is_none() && status.tasks.len() > 1;
    let names: HashMap<String, String> = status
        .tasks
        .iter()
        .map(|t| (t.task_id.to_string(), t.name.clone()))
        .collect();
    let (mut pending, mut events) = api.job_events(job, &["log", "state"]).await?;
    let mut finished = status.status.is_finished();
    while pending > 0 || (follow && !finished) {
        let Some((ev, left)) = events.next().await else {
            break;
        };
        pending = left;
        if wanted.as_deref().is_some_and(|w| w != ev.task_id.as_str()) {
            continue;
        }
        match ev.body {
            gpufleet_schema::EventBody::Log {
                stream,
                text,
                dropped_bytes,
            } => {
                use std::io::Write;
                let prefix = if multi {
                    format!(
                        "[{}] ",
                        names.get(ev.task_id.as_str()).cloned().unwrap_or_default()
                    )
                } else {
                    String::new()
                };
                let mut out: Box<dyn Write> = match stream {
                    gpufleet_schema::LogStream::Stdout => Box::new(std::io::stdout().lock()),
                    gpufleet_schema::LogStream::Stderr => Box::new(std::io::stderr().lock()),
                };
                if dropped_bytes > 0 {
                    writeln!(
                        out,
                        "{prefix}[gpufleet: {dropped_bytes} bytes of output dropped here]"
                    )?;
                }
                for line in text.split_inclusive('\n') {
                    write!(out, "{prefix}{line}")?;
                }
            }
            gpufleet_schema::EventBody::State { .. } if follow => {
                finished = api.get(job).await?.status.is_finished();
            }
            _ => {}
        }
    }
    Ok(0)
}

async fn artifacts(api: &Api, command: ArtifactsCmd, json: bool) -> anyhow::Result<i32> {
    let js = async_nats::jetstream::new(api.client.clone());
    let store = js
        .get_object_store(subjects::ARTIFACTS_BUCKET)
        .await
        .context("opening the artifacts store")?;
    let mut infos = Vec::new();
    {
        use futures::StreamExt;
        let mut list = store.list().await?;
        while let Some(i) = list.next().await {
            infos.push(i?);
        }
    }
    match command {
        ArtifactsCmd::List { job } => {
            let prefix = format!("{job}/");
            let rows: Vec<Vec<String>> = infos
                .iter()
                .filter(|i| i.name.starts_with(&prefix) && !i.deleted)
                .map(|i| {
                    vec![
                        i.name.clone(),
                        gpufleet_schema::ByteSize(i.size as u64).to_string(),
                    ]
                })
                .collect();
            if json {
                print_json(
                    &rows
                        .iter()
                        .map(|r| serde_json::json!({"object": r[0], "size": r[1]}))
                        .collect::<Vec<_>>(),
                );
            } else {
                println!("{}", show::table(&["OBJECT", "SIZE"], &rows));
            }
            Ok(0)
        }
        ArtifactsCmd::Get {
            job,
            task,
            name,
            output,
        } => {
            let status = api.get(&job_id(&job)?).await?;
            let t = status
                .tasks
                .iter()
                .find(|t| t.task_id.as_str() == task || t.name == task)
                .with_context(|| format!("job {job} has no task {task:?}"))?;
            // The newest attempt that uploaded this name.
            let object = (1..=t.attempt)
                .rev()
                .map(|a| format!("{job}/{}/{a}/{name}", t.task_id))
                .find(|o| infos.iter().any(|i| &i.name == o && !i.deleted))
                .with_context(|| format!("no artifact {name:?} for task {task} of job {job}"))?;
            let path = output.unwrap_or_else(|| {
                PathBuf::from(std::path::Path::new(&name).file_name().unwrap_or_default())
            });
            let mut obj = store.get(&object).await?;
            let mut file = tokio::fs::File::create(&path)
                .await
                .with_context(|| format!("creating {}", path.display()))?;
            let n = tokio::io::copy(&mut obj, &mut file).await?;
            eprintln!("wrote {} ({n} bytes) from {object}", path.display());
            Ok(0)
        }
    }
}
