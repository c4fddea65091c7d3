//! `gantry`: the user CLI. Parses flags and calls the `gantry_client` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gantry_client::config::CliConfig;
use gantry_client::dev::{self, DevConfig};
use gantry_client::run::RunArgs;
use gantry_client::{functions, image, print, run as submit};
use gantry_shared::calls::OutputOrder;

#[derive(Parser)]
#[command(
    name = "gantry",
    version,
    about = "Gantry: run jobs on your own GPU hosts",
    after_help = "Python apps (the Python SDK, run as `$GANTRY_PYTHON -m gantry`, python3 by default):\n  \
        gantry run FILE.py[::FUNCTION] [ARGS...]   run an ephemeral app until the command ends\n  \
        gantry deploy FILE.py [ARGS...]            deploy a persistent app\n  \
        gantry serve FILE.py [ARGS...]             deploy, and redeploy when its files change"
)]
struct Cli {
    /// Print data as JSON.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    output: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator and one agent on this machine until Ctrl-C.
    Dev {
        #[arg(long, env = "GANTRY_DEV_DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:7080")]
        api_listen: String,
        #[arg(long, default_value = "127.0.0.1:7443")]
        control_listen: String,
        /// The (first) agent's node name; further agents are `<node>-2`, `<node>-3`, ….
        #[arg(long, default_value = "dev-node")]
        node: String,
        /// How many agents to run on this machine (own state directories and ports).
        #[arg(long, default_value_t = 1)]
        agents: u32,
        /// Give every agent simulated GPUs, e.g. `8xH100-80GB,nvlink=4` (reported as
        /// simulated; containers get CUDA_VISIBLE_DEVICES but no devices).
        #[arg(long, value_name = "SPEC")]
        simulate_gpus: Option<String>,
        /// Run the demo instead of waiting: push this root filesystem as image `demo`, run
        /// a job on it, print its output, stop, and exit with the job's exit code.
        #[arg(long, value_name = "ROOTFS")]
        demo: Option<PathBuf>,
        /// On a terminal, show the coordinator's and agents' logs from `info` up (default:
        /// only warnings and errors). Off a terminal they are always JSON from `info`.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Submit a job; without --detach, wait for it and exit with its exit code.
    Run {
        #[arg(long)]
        image: String,
        #[arg(long)]
        name: Option<String>,
        /// Cores (`0.5`) or millicores (`500m`), per node.
        #[arg(long = "cpus", visible_alias = "cpu", default_value = "1")]
        cpu: String,
        #[arg(long, default_value = "512M")]
        memory: String,
        /// GPUs per node.
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        /// Acceptable GPU models in order of preference, e.g. `H100,A100`.
        #[arg(long = "gpu-type", value_delimiter = ',')]
        gpu_types: Vec<String>,
        /// Least memory each GPU must have, e.g. `40G`.
        #[arg(long)]
        gpu_memory: Option<String>,
        /// Gang size: nodes that run the job together, one container each, with ranks.
        #[arg(long, default_value_t = 1)]
        nodes: u32,
        /// A node label that must match, `KEY=VALUE`; repeatable.
        #[arg(long = "selector", value_parser = gantry_shared::gossip::parse_label)]
        selectors: Vec<(String, String)>,
        /// May run on spot (preemptible) nodes.
        #[arg(long)]
        spot: bool,
        /// Higher runs first.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i32,
        /// `KEY=VALUE`, repeatable.
        #[arg(long, short, value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// A secret the job gets: `NAME` (environment variables) or `NAME:files` (files
        /// under /run/secrets/NAME/); repeatable.
        #[arg(long = "secret", value_parser = gantry_client::secrets::parse_use)]
        secrets: Vec<gantry_shared::secrets::SecretUse>,
        /// A volume mounted into the job's containers: `NAME:/path`; repeatable.
        #[arg(long = "volume", value_parser = gantry_client::volumes::parse_mount)]
        volumes: Vec<(
            gantry_shared::volumes::MountPath,
            gantry_shared::volumes::VolumeUse,
        )>,
        #[arg(long, default_value_t = 0)]
        retries: u32,
        /// Wait before the first retry, e.g. `1s` (doubling per failure, at most 5m).
        #[arg(long)]
        retry_delay: Option<String>,
        /// e.g. `30m`.
        #[arg(long)]
        timeout: Option<String>,
        #[arg(long, short)]
        detach: bool,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List, show or cancel jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Print a job's output (of its latest attempt).
    Logs {
        id: String,
        /// Keep printing until the attempt's container exits.
        #[arg(long, short)]
        follow: bool,
        /// Which member of a gang.
        #[arg(long)]
        rank: Option<u32>,
    },
    /// Images in the cluster's embedded registry.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List or show nodes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// API tokens (admin): create one, or revoke every token with a name.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Secrets: create (admin), list names and keys, delete (admin).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Schedules: list all (functions' come from their manifests); create or delete a job
    /// template's.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// Volumes: directories that outlive containers, mounted with `--volume NAME:/path`
    /// or `volumes = { "/data" = "NAME" }`.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Deploy an app's functions from its manifest (a new immutable version).
    Deploy {
        /// The app manifest.
        #[arg(long, short = 'f', default_value = "gantry.toml")]
        file: PathBuf,
    },
    /// Deployed apps: list, show, stop, roll back.
    #[command(subcommand)]
    Apps(AppsCommand),
    /// Call a function with one input and print its output.
    Call {
        app: String,
        function: String,
        /// The input: text, `@FILE`, or `-` for standard input (default: empty).
        #[arg(long, short)]
        data: Option<String>,
        /// The input's content type (default: text/plain for text, else
        /// application/octet-stream).
        #[arg(long)]
        content_type: Option<String>,
        /// Print the call id at once instead of waiting (`gantry calls get ID` later).
        #[arg(long = "async")]
        detach: bool,
    },
    /// Functions of every app: containers, queue, inputs per second, latency.
    #[command(subcommand)]
    Functions(FunctionsCommand),
    /// Calls: wait for one's output, show where its time went, cancel it.
    #[command(subcommand)]
    Calls(CallsCommand),
    /// Call a function once per line of a file; print one output per line as they come, in
    /// input order.
    Map {
        app: String,
        function: String,
        /// One input per line (`-`: standard input).
        #[arg(long)]
        input_file: String,
        /// Each input's content type.
        #[arg(long, default_value = "application/json")]
        content_type: String,
        /// Print outputs as they complete, each as `INDEX<TAB>OUTPUT`.
        #[arg(long)]
        unordered: bool,
    },
}

#[derive(Subcommand)]
enum AppsCommand {
    List,
    Show {
        app: String,
    },
    /// Refuse new calls; accepted inputs finish and containers drain.
    Stop {
        app: String,
    },
    /// Point new calls at an earlier version (default: the one before the active one).
    Rollback {
        app: String,
        #[arg(long)]
        version: Option<u64>,
    },
}

#[derive(Subcommand)]
enum FunctionsCommand {
    List,
    Show { app: String, function: String },
}

#[derive(Subcommand)]
enum CallsCommand {
    /// Wait for a call's outputs and print them.
    Get { id: String },
    /// Each input's state, container and where its time went.
    Show { id: String },
    /// Drop queued inputs; running ones are told, then stopped.
    Cancel { id: String },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Create a token; it is printed once.
    Create {
        /// `reader`, `submitter` or `admin`.
        #[arg(long, default_value = "submitter")]
        role: String,
        /// What it is for (`ci`, `alice`, `admin-2026-12`); revocation goes by name.
        #[arg(long)]
        name: String,
    },
    /// Revoke every token named NAME (not the one making the request).
    Revoke { name: String },
}

#[derive(Subcommand)]
enum SchedulesCommand {
    /// Every schedule with its next and last run.
    List,
    /// Submit a job template on a cron expression or every period (replaces one of that
    /// name).
    Create {
        name: String,
        /// A cron expression (`*/5 * * * *`: 5 fields, or 6 with seconds first).
        #[arg(long, conflicts_with = "period")]
        cron: Option<String>,
        /// The cron expression's IANA time zone (default UTC).
        #[arg(long, requires = "cron")]
        timezone: Option<String>,
        /// Every this long instead (`30s`, `1h`).
        #[arg(long)]
        period: Option<String>,
        /// Run a tick even while the run before is still going (default: skip it).
        #[arg(long)]
        allow_overlap: bool,
        /// The job to submit each tick: a job spec as JSON, as `POST /v1/jobs` takes.
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
    },
    /// Delete a job template's schedule.
    Delete { name: String },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume: local to one node (picked for you, or --node), optionally of a
    /// fixed --size, or --shared (on every node's shared path).
    Create {
        name: String,
        #[arg(long)]
        node: Option<String>,
        /// The most it holds (`10G`); a writer past it gets "no space left on device".
        #[arg(long)]
        size: Option<String>,
        #[arg(long, conflicts_with_all = ["node", "size"])]
        shared: bool,
    },
    /// List the volumes.
    List,
    /// Copy a local file, or a directory and everything in it, into a volume (REMOTE:
    /// LOCAL's name at the root by default; ending in `/`, a directory to put it in).
    Put {
        name: String,
        local: PathBuf,
        remote: Option<String>,
    },
    /// Copy a file, or a directory and everything in it, out of a volume (LOCAL: REMOTE's
    /// name here by default; `-` writes a file to standard output).
    Get {
        name: String,
        remote: String,
        local: Option<PathBuf>,
    },
    /// List what is in a volume (its root, or PATH).
    Ls {
        name: String,
        path: Option<String>,
        /// All the way down.
        #[arg(long, short)]
        recursive: bool,
    },
    /// Remove a file, or a directory and everything in it, from a volume.
    Rm { name: String, path: String },
    /// Delete a volume and its files (refused while a job or deployed function mounts it).
    Delete { name: String },
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Create a secret from `KEY=VALUE` pairs and/or an env file.
    Create {
        name: String,
        /// `KEY=VALUE`, repeatable (keys: letters, digits and `_`).
        pairs: Vec<String>,
        /// Read `KEY=VALUE` lines from FILE (a `.env` file).
        #[arg(long, value_name = "FILE")]
        from_env_file: Option<PathBuf>,
        /// Replace a secret of that name (containers started afterwards get the new values).
        #[arg(long)]
        force: bool,
    },
    /// List the secrets: names and keys, never values.
    List,
    /// Delete a secret (running containers keep what they got).
    Delete { name: String },
}

#[derive(Subcommand)]
enum JobsCommand {
    List {
        /// Only jobs in this state (pending, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
    },
    Show {
        id: String,
    },
    Cancel {
        id: String,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Push a root filesystem (directory or uncompressed tarball) as an image.
    Import {
        source: PathBuf,
        #[arg(long)]
        name: String,
        /// Default command (`--cmd sh --cmd -c …`).
        #[arg(long, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    List,
    /// Build an image from a recipe (TOML or JSON: a base and steps) inside the cluster;
    /// unchanged steps come from the cache. Prints the image to run.
    Build {
        /// The recipe.
        #[arg(long, short)]
        file: PathBuf,
        /// What to call it (`name` or `name:tag`); by default `recipe:<key>`.
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum NodesCommand {
    List,
    Show {
        id: String,
    },
    /// Take no new work; running work finishes, or at the deadline is stopped and placed
    /// elsewhere.
    Drain {
        id: String,
        /// e.g. `30m`; without one, running work may take as long as it needs.
        #[arg(long)]
        deadline: Option<String>,
    },
    /// Take new work again.
    Undrain {
        id: String,
    },
    /// Declare a GPU healthy again after dealing with its fault (until then it is never
    /// placed on, even across agent restarts).
    GpuClear {
        id: String,
        /// Host index of the GPU.
        #[arg(long)]
        gpu: u32,
    },
    /// A spot-interruption notice: stop the node's work now (SIGTERM, a grace bounded by
    /// the deadline, SIGKILL) and place it elsewhere.
    Preempt {
        id: String,
        /// When the node goes away, e.g. `30s`.
        #[arg(long)]
        deadline: Option<String>,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(args) = gantry_client::python::handoff(&argv) {
        let python = std::env::var_os(gantry_client::python::PYTHON_VAR);
        eprintln!("gantry: {}", gantry_client::python::exec(python, args));
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse_from(argv);
    if !matches!(cli.command, Command::Dev { .. }) {
        exit_quietly_on_closed_pipe();
    }
    // Sockets are written on the runtime's threads: a server that closes a connection
    // while a body is still being sent must give an error there, not kill the CLI with
    // the SIGPIPE that stdout's readers may.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(ignore_sigpipe_on_this_thread)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gantry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("gantry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `gantry jobs list | head -3`: when the reader goes away, end at the next write as Unix
/// tools do (killed by SIGPIPE, status 141 in a shell) instead of panicking in `println!`.
/// Rust ignores SIGPIPE by default; `gantry dev` keeps that, since it must outlive its
/// terminal's readers long enough to stop its children.
fn exit_quietly_on_closed_pipe() {
    // SAFETY: called first thing in main, before any thread exists; restoring a signal's
    // default disposition has no other effect on this process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Blocks SIGPIPE on the calling thread: a write to a closed socket there fails with
/// EPIPE instead.
fn ignore_sigpipe_on_this_thread() {
    // SAFETY: changes only this thread's signal mask, with a set built here.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.output == "json";
    match cli.command {
        Command::Dev {
            state_dir,
            api_listen,
            control_listen,
            node,
            agents,
            simulate_gpus,
            demo,
            verbose,
        } => {
            let state_dir = state_dir.unwrap_or_else(|| {
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/var/lib"))
                    .join(".local/share/gantry/dev")
            });
            dev::run(DevConfig {
                state_dir,
                api_listen,
                control_listen,
                node,
                agents,
                simulate_gpus,
                demo,
                verbose,
            })
            .await
        }
        Command::Run {
            image,
            name,
            cpu,
            memory,
            gpus,
            gpu_types,
            gpu_memory,
            nodes,
            selectors,
            spot,
            priority,
            env,
            secrets,
            volumes,
            retries,
            retry_delay,
            timeout,
            detach,
            command,
        } => {
            let cfg = CliConfig::load()?;
            submit::run(
                &cfg,
                RunArgs {
                    image,
                    name,
                    cpu,
                    memory,
                    gpus,
                    gpu_types,
                    gpu_memory,
                    nodes,
                    selector: selectors,
                    spot,
                    priority,
                    env,
                    secrets,
                    volumes,
                    retries,
                    retry_delay,
                    timeout,
                    command,
                    detach,
                },
                json,
            )
            .await
        }
        Command::Jobs(cmd) => {
            let client = CliConfig::load()?.client()?;
            match cmd {
                JobsCommand::List { state } => {
                    let mut jobs = Vec::new();
                    let mut token: Option<String> = None;
                    loop {
                        let page = client.jobs(state.as_deref(), token.as_deref()).await?;
                        jobs.extend(page.jobs);
                        match page.next_page_token {
                            Some(t) => token = Some(t),
                            None => break,
                        }
                    }
                    print::print_jobs(&jobs, json)?;
                }
                JobsCommand::Show { id } => print::print_job(&client.job(&id).await?, json)?,
                JobsCommand::Cancel { id } => print::print_job(&client.cancel(&id).await?, json)?,
            }
            Ok(0)
        }
        Command::Logs { id, follow, rank } => {
            let client = CliConfig::load()?.client()?;
            client
                .logs(&id, follow, rank, &mut std::io::stdout())
                .await?;
            Ok(0)
        }
        Command::Image(ImageCommand::Import { source, name, cmd }) => {
            let digest = image::import_image(&CliConfig::load()?, &source, &name, cmd).await?;
            if json {
                println!("{}", serde_json::json!({"name": name, "digest": digest}));
            } else {
                println!("{name} {digest}");
            }
            Ok(0)
        }
        Command::Image(ImageCommand::Build { file, name }) => {
            image::build(&CliConfig::load()?, &file, name, json).await
        }
        Command::Image(ImageCommand::List) => {
            let images = image::list_images(&CliConfig::load()?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                for image in images {
                    println!("{image}");
                }
            }
            Ok(0)
        }
        Command::Nodes(cmd) => {
            let client = CliConfig::load()?.client()?;
            match cmd {
                NodesCommand::List => print::print_nodes(&client.nodes().await?, json)?,
                NodesCommand::Show { id } => print::print_node(&client.node(&id).await?, json)?,
                NodesCommand::Drain { id, deadline } => print::print_node(
                    &client
                        .node_action(&id, "drain", deadline.as_deref())
                        .await?,
                    json,
                )?,
                NodesCommand::GpuClear { id, gpu } => {
                    print::print_node(&client.clear_gpu(&id, gpu).await?, json)?
                }
                NodesCommand::Undrain { id } => {
                    print::print_node(&client.node_action(&id, "undrain", None).await?, json)?
                }
                NodesCommand::Preempt { id, deadline } => print::print_node(
                    &client
                        .node_action(&id, "preempt", deadline.as_deref())
                        .await?,
                    json,
                )?,
            }
            Ok(0)
        }
        Command::Tokens(cmd) => {
            let client = CliConfig::load()?.client()?;
            match cmd {
                TokensCommand::Create { role, name } => {
                    let created = client.create_api_token(&role, &name).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&created)?);
                    } else {
                        println!("{}", created.token);
                        eprintln!("a {role} token named `{name}`; it is not shown again");
                    }
                }
                TokensCommand::Revoke { name } => {
                    let revoked = client.revoke_api_tokens(&name).await?;
                    println!("revoked {revoked} token(s) named `{name}`");
                }
            }
            Ok(0)
        }
        Command::Schedules(cmd) => {
            let client = CliConfig::load()?.client()?;
            match cmd {
                SchedulesCommand::List => {
                    gantry_client::schedules::print_list(&client.schedules().await?, json)?
                }
                SchedulesCommand::Create {
                    name,
                    cron,
                    timezone,
                    period,
                    allow_overlap,
                    job,
                } => {
                    let req = gantry_client::schedules::create_request(
                        &name,
                        (cron, timezone, period),
                        allow_overlap,
                        &job,
                    )?;
                    let view = client.put_schedule(&req).await?;
                    gantry_client::schedules::print_list(&[view], json)?;
                }
                SchedulesCommand::Delete { name } => {
                    client.delete_schedule(&name).await?;
                    println!("deleted schedule `{name}`");
                }
            }
            Ok(0)
        }
        Command::Volume(cmd) => {
            let client = CliConfig::load()?.client()?;
            volume(&client, cmd, json).await?;
            Ok(0)
        }
        Command::Secret(cmd) => {
            let client = CliConfig::load()?.client()?;
            match cmd {
                SecretCommand::Create {
                    name,
                    pairs,
                    from_env_file,
                    force,
                } => {
                    let values = gantry_client::secrets::values(&pairs, from_env_file.as_deref())?;
                    let view =
                        gantry_client::secrets::create(&client, &name, values, force).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&view)?);
                    } else {
                        println!("secret `{name}`: {}", view.keys.join(", "));
                    }
                }
                SecretCommand::List => {
                    gantry_client::secrets::print_list(&client.secrets().await?, json)?
                }
                SecretCommand::Delete { name } => {
                    client.delete_secret(&name).await?;
                    println!("deleted secret `{name}`");
                }
            }
            Ok(0)
        }
        Command::Deploy { file } => {
            // A bad manifest is reported before anything is sent.
            functions::read_manifest(&file)?;
            let client = CliConfig::load()?.client()?;
            functions::deploy(&client, &file, json).await
        }
        Command::Apps(cmd) => {
            let client = CliConfig::load()?.client()?;
            match cmd {
                AppsCommand::List => functions::print_apps(&client.apps().await?, json)?,
                AppsCommand::Show { app } => functions::print_app(&client.app(&app).await?, json)?,
                AppsCommand::Stop { app } => {
                    functions::print_app(&client.app_action(&app, "stop", None).await?, json)?
                }
                AppsCommand::Rollback { app, version } => functions::print_app(
                    &client.app_action(&app, "rollback", version).await?,
                    json,
                )?,
            }
            Ok(0)
        }
        Command::Call {
            app,
            function,
            data,
            content_type,
            detach,
        } => {
            let input = functions::read_data(data.as_deref(), content_type.as_deref())?;
            let client = CliConfig::load()?.client()?;
            functions::call(&client, &app, &function, input, detach, json).await
        }
        Command::Functions(cmd) => {
            let client = CliConfig::load()?.client()?;
            let apps = client.apps().await?;
            match cmd {
                FunctionsCommand::List => functions::print_functions(&apps, None, json)?,
                FunctionsCommand::Show { app, function } => {
                    functions::print_functions(&apps, Some((&app, &function)), json)?
                }
            }
            Ok(0)
        }
        Command::Calls(cmd) => {
            let client = CliConfig::load()?.client()?;
            match cmd {
                CallsCommand::Get { id } => {
                    let view = functions::wait(&client, client.call_view(&id, None).await?).await?;
                    functions::print_results(&view, json)
                }
                CallsCommand::Show { id } => {
                    functions::print_call(&client.call_view(&id, None).await?, json)?;
                    Ok(0)
                }
                CallsCommand::Cancel { id } => {
                    functions::print_call(&client.cancel_call(&id).await?, json)?;
                    Ok(0)
                }
            }
        }
        Command::Map {
            app,
            function,
            input_file,
            content_type,
            unordered,
        } => {
            let client = CliConfig::load()?.client()?;
            let order = if unordered {
                OutputOrder::Completion
            } else {
                OutputOrder::Input
            };
            functions::map(&client, &app, &function, &input_file, &content_type, order).await
        }
    }
}

/// `gantry volume …`.
async fn volume(
    client: &gantry_client::api::ApiClient,
    cmd: VolumeCommand,
    json: bool,
) -> anyhow::Result<()> {
    use gantry_client::volumes;
    match cmd {
        VolumeCommand::Create {
            name,
            node,
            size,
            shared,
        } => {
            let req = gantry_shared::volumes::CreateVolume {
                name: gantry_shared::volumes::VolumeName::new(name)?,
                shared,
                node: node.map(gantry_shared::NodeId::new).transpose()?,
                size: size
                    .map(|s| {
                        gantry_shared::Parsed::try_from(s)
                            .map_err(|e| anyhow::anyhow!("--size: {e}"))
                    })
                    .transpose()?,
            };
            let v = client.create_volume(&req).await?;
            volumes::print_volumes(std::slice::from_ref(&v), json)?;
        }
        VolumeCommand::List => volumes::print_volumes(&client.volumes().await?, json)?,
        VolumeCommand::Put {
            name,
            local,
            remote,
        } => {
            let (files, bytes) = volumes::put(client, &name, &local, remote.as_deref()).await?;
            eprintln!(
                "put {files} file(s), {} into volume `{name}`",
                gantry_shared::resources::bytes_text(bytes)
            );
        }
        VolumeCommand::Get {
            name,
            remote,
            local,
        } => {
            let (files, bytes) = volumes::get(client, &name, &remote, local.as_deref()).await?;
            eprintln!(
                "got {files} file(s), {} from volume `{name}`",
                gantry_shared::resources::bytes_text(bytes)
            );
        }
        VolumeCommand::Ls {
            name,
            path,
            recursive,
        } => {
            let listing = client
                .volume_ls(&name, path.as_deref().unwrap_or(""), recursive)
                .await?;
            volumes::print_listing(&listing, json)?;
        }
        VolumeCommand::Rm { name, path } => {
            client.volume_rm(&name, &path).await?;
            eprintln!("removed `{path}` from volume `{name}`");
        }
        VolumeCommand::Delete { name } => {
            client.delete_volume(&name).await?;
            println!("deleted volume `{name}`");
        }
    }
    Ok(())
}
