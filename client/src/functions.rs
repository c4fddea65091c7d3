//! The function commands: `gantry deploy`, `gantry apps …`, `gantry call`, `gantry calls
//! …` and `gantry map`.

use std::io::{BufRead, Read, Write};
use std::path::Path;

use anyhow::{Context, bail};
use gantry_shared::calls::{
    AppendRequest, CallRequest, CallState, CallView, InputState, InputView, OutputOrder, Payload,
};
use gantry_shared::functions::{AppManifest, AppView};

use crate::api::{ApiClient, ClientError};

/// How long one request of a call waits for its outputs before asking again.
const LONG_POLL: &str = "55s";
/// Inputs per request of `gantry map`.
const MAP_CHUNK: usize = 500;

/// Reads and checks `gantry.toml`; errors name the file, the key and the line.
pub fn read_manifest(path: &Path) -> anyhow::Result<AppManifest> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {}; write an app manifest there or pass -f FILE",
            path.display()
        )
    })?;
    let manifest: AppManifest = gantry_shared::config::parse(path, &text)?;
    manifest
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(manifest)
}

pub async fn deploy(api: &ApiClient, path: &Path, json: bool) -> anyhow::Result<i32> {
    let manifest = read_manifest(path)?;
    let d = api.deploy(&manifest).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        let names: Vec<&str> = d.manifest.functions.keys().map(|f| f.as_str()).collect();
        println!(
            "deployed {} version {} ({})",
            d.app,
            d.version,
            names.join(", ")
        );
    }
    Ok(0)
}

pub fn print_apps(apps: &[AppView], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(apps)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>8} {:>9}  FUNCTIONS",
        "APP", "VERSION", "VERSIONS"
    );
    for a in apps {
        let version = a
            .active_version
            .map_or_else(|| "stopped".to_owned(), |v| v.to_string());
        let names: Vec<String> = a.functions.iter().map(|f| f.name.to_string()).collect();
        println!(
            "{:<24} {:>8} {:>9}  {}",
            a.app,
            version,
            a.versions.len(),
            names.join(", ")
        );
    }
    Ok(())
}

pub fn print_app(a: &AppView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(a)?);
        return Ok(());
    }
    let active = a
        .active_version
        .map_or_else(|| "none (stopped)".to_owned(), |v| v.to_string());
    println!("app:      {}", a.app);
    println!("active:   {active}");
    let versions: Vec<String> = a.versions.iter().map(|v| v.version.to_string()).collect();
    println!("versions: {}", versions.join(", "));
    println!(
        "\n{:<24} {:>7} {:>8} {:>5} {:>5} {:>8} {:>7} {:>7} {:>7}",
        "FUNCTION",
        "VERSION",
        "STARTING",
        "IDLE",
        "BUSY",
        "DRAINING",
        "QUEUED",
        "RUNNING",
        "DESIRED"
    );
    for f in &a.functions {
        println!(
            "{:<24} {:>7} {:>8} {:>5} {:>5} {:>8} {:>7} {:>7} {:>7}",
            f.name,
            f.version,
            f.starting,
            f.idle,
            f.busy,
            f.draining,
            f.queued,
            f.running,
            f.desired
        );
    }
    Ok(())
}

/// `gantry functions list` (every app) or `show` (one function, `only`): containers by
/// state, queue, inputs per second and latency over the last minute.
pub fn print_functions(
    apps: &[AppView],
    only: Option<(&str, &str)>,
    json: bool,
) -> anyhow::Result<()> {
    let rows: Vec<(&AppView, &gantry_shared::functions::FunctionView)> = apps
        .iter()
        .flat_map(|a| a.functions.iter().map(move |f| (a, f)))
        .filter(|(a, f)| {
            only.is_none_or(|(app, name)| a.app.as_str() == app && f.name.as_str() == name)
        })
        .collect();
    if let Some((app, name)) = only
        && rows.is_empty()
    {
        bail!("no function `{name}` in app `{app}` (see `gantry functions list`)");
    }
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(a, f)| serde_json::json!({ "app": a.app, "function": f }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<28} {:>4} {:>5} {:>5} {:>5} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8}",
        "FUNCTION",
        "VER",
        "START",
        "IDLE",
        "BUSY",
        "DRAIN",
        "QUEUED",
        "RUNNING",
        "IN/S",
        "P50",
        "P99"
    );
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v}ms"));
    for (a, f) in rows {
        println!(
            "{:<28} {:>4} {:>5} {:>5} {:>5} {:>6} {:>7} {:>7} {:>7.1} {:>8} {:>8}",
            format!("{}/{}", a.app, f.name),
            f.version,
            f.starting,
            f.idle,
            f.busy,
            f.draining,
            f.queued,
            f.running,
            f64::from(f.ended_last_minute) / 60.0,
            ms(f.p50_ms),
            ms(f.p99_ms)
        );
    }
    Ok(())
}

/// The input `--data` names: text, `@FILE`, or `-` for standard input.
pub fn read_data(data: Option<&str>, content_type: Option<&str>) -> anyhow::Result<Payload> {
    let (bytes, guessed) = match data {
        None => (Vec::new(), "application/octet-stream"),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the input from standard input")?;
            (buf, "application/octet-stream")
        }
        Some(d) => match d.strip_prefix('@') {
            Some(file) => (
                std::fs::read(file).with_context(|| format!("cannot read {file}"))?,
                "application/octet-stream",
            ),
            None => (d.as_bytes().to_vec(), "text/plain"),
        },
    };
    let content_type = content_type.unwrap_or(guessed).to_owned();
    let p = Payload::new(content_type, bytes);
    p.check()?;
    Ok(p)
}

/// Waits for a call to end, asking again after each long poll.
pub async fn wait(api: &ApiClient, mut view: CallView) -> anyhow::Result<CallView> {
    while view.state == CallState::Running {
        view = api.call_view(view.id.as_str(), Some(LONG_POLL)).await?;
    }
    Ok(view)
}

/// `gantry call`: prints the output (or, with `--async`, the call id); a failed input
/// prints its error and exits 1.
pub async fn call(
    api: &ApiClient,
    app: &str,
    function: &str,
    input: Payload,
    detach: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let request = CallRequest {
        input: Some(input),
        inputs: Vec::new(),
        wait: !detach,
        open: false,
    };
    let view = api.call(app, function, &request).await?;
    if detach {
        if json {
            println!("{}", serde_json::to_string_pretty(&view)?);
        } else {
            println!("{}", view.id);
        }
        return Ok(0);
    }
    let view = wait(api, view).await?;
    print_results(&view, json)
}

/// Prints each input's output in order (raw bytes, one per line for a map); failures go to
/// standard error. Exit status 1 if any input failed or was cancelled.
pub fn print_results(view: &CallView, json: bool) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(view)?);
        return Ok(i32::from(view.state != CallState::Succeeded));
    }
    let mut out = std::io::stdout().lock();
    let many = view.results.len() > 1;
    for r in &view.results {
        write_result(&mut out, r, many)?;
    }
    out.flush()?;
    Ok(i32::from(view.state != CallState::Succeeded))
}

fn write_result(out: &mut impl Write, r: &InputView, many: bool) -> anyhow::Result<()> {
    match (&r.output, &r.error) {
        (Some(p), _) => {
            out.write_all(&p.bytes)?;
            if many || !p.bytes.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
        }
        (None, Some(e)) => {
            if many {
                writeln!(out, "{}", serde_json::json!({ "error": e }))?;
            }
            eprintln!(
                "gantry: input {} failed: {}: {}",
                r.index, e.error_type, e.message
            );
            if let Some(tb) = &e.traceback {
                eprintln!("{tb}");
            }
        }
        (None, None) => {
            if many {
                writeln!(out, "{}", serde_json::json!({ "state": r.state }))?;
            }
            if r.state == InputState::Cancelled {
                eprintln!("gantry: input {} was cancelled", r.index);
            }
        }
    }
    Ok(())
}

/// `gantry calls show`: each input with its state, container and where its time went.
pub fn print_call(view: &CallView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(view)?);
        return Ok(());
    }
    println!("call:     {}", view.id);
    println!(
        "function: {}/{} (version {})",
        view.app, view.function, view.version
    );
    println!("state:    {}", state_name(view.state));
    println!(
        "inputs:   {} ({} succeeded, {} failed)",
        view.inputs, view.succeeded, view.failed
    );
    println!(
        "\n{:>5} {:<10} {:>3} {:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "INPUT", "STATE", "TRY", "CONTAINER", "QUEUED", "PLACE", "IMAGE", "STARTUP", "RUN", "TOTAL"
    );
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v}ms"));
    for r in &view.results {
        let t = &r.timings;
        println!(
            "{:>5} {:<10} {:>3} {:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            r.index,
            serde_json::to_value(r.state)?.as_str().unwrap_or("?"),
            r.attempt,
            r.container.as_ref().map_or("-", |c| c.as_str()),
            ms(t.queued_ms),
            ms(t.placement_ms),
            ms(t.image_ms),
            ms(t.startup_ms),
            ms(t.run_ms),
            ms(t.total_ms)
        );
        if let Some(e) = &r.error {
            println!("      {}: {}", e.error_type, e.message);
        }
    }
    Ok(())
}

fn state_name(s: CallState) -> &'static str {
    match s {
        CallState::Running => "running",
        CallState::Succeeded => "succeeded",
        CallState::Failed => "failed",
        CallState::Cancelled => "cancelled",
    }
}

/// `gantry map`: one input per line of `file` (`-`: standard input), streamed into one
/// open map (the server holds at most 1,000 outstanding, so a long file waits for room as
/// it goes); prints one output per line as they come, in input order, or with
/// [`OutputOrder::Completion`] as they complete, each prefixed by its index and a tab.
/// Exit 1 if any input failed.
pub async fn map(
    api: &ApiClient,
    app: &str,
    function: &str,
    file: &str,
    content_type: &str,
    order: OutputOrder,
) -> anyhow::Result<i32> {
    let reader: Box<dyn BufRead + Send> = if file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot read {file}"))?,
        ))
    };
    // Lines are read on their own thread, so a slow producer on stdin does not hold up
    // the printing of outputs; the channel's bound is the read-ahead.
    let (tx, mut chunks) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<Payload>>>(2);
    let content_type = content_type.to_owned();
    std::thread::spawn(move || {
        let mut chunk = Vec::new();
        for line in reader.lines() {
            let p = line
                .context("reading the inputs")
                .map(|l| Payload::new(content_type.as_str(), l.into_bytes()))
                .and_then(|p| p.check().map(|()| p).map_err(anyhow::Error::from));
            match p {
                Ok(p) => chunk.push(p),
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
            if chunk.len() == MAP_CHUNK && tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err()
            {
                return;
            }
        }
        if !chunk.is_empty() {
            let _ = tx.blocking_send(Ok(chunk));
        }
    });
    let first = match chunks.recv().await {
        Some(chunk) => chunk?,
        None => bail!("{file} holds no inputs; write one input per line"),
    };
    let mut sent = first.len() as u32;
    let request = CallRequest {
        input: None,
        inputs: first,
        wait: false,
        open: true,
    };
    let id = api.call(app, function, &request).await?.id.to_string();
    let feed = async {
        let fed = async {
            loop {
                let chunk = chunks.recv().await.transpose()?;
                let close = chunk.is_none();
                let request = AppendRequest {
                    start: sent,
                    inputs: chunk.unwrap_or_default(),
                    close,
                };
                append(api, &id, &request).await?;
                sent += request.inputs.len() as u32;
                if close {
                    return anyhow::Ok(());
                }
            }
        }
        .await;
        if fed.is_err() {
            // Nothing more comes: what was sent is dropped rather than left open.
            let _ = api.cancel_call(&id).await;
        }
        fed
    };
    let read = async {
        let mut from = 0;
        let mut failed = false;
        loop {
            let page = api.call_outputs(&id, from, order, LONG_POLL).await?;
            let mut out = std::io::stdout().lock();
            for r in &page.results {
                if order == OutputOrder::Completion {
                    write!(out, "{}\t", r.index)?;
                }
                write_result(&mut out, r, true)?;
                failed |= r.state != InputState::Succeeded;
            }
            out.flush()?;
            from = page.next;
            if page.done {
                return anyhow::Ok(failed);
            }
        }
    };
    let ((), failed) = tokio::try_join!(feed, read)?;
    Ok(i32::from(failed))
}

/// Adds inputs to an open map, asking again while the map is full (429).
async fn append(api: &ApiClient, id: &str, request: &AppendRequest) -> anyhow::Result<()> {
    loop {
        match api.append_inputs(id, request).await {
            Ok(_) => return Ok(()),
            Err(ClientError::Api { status: 429, .. }) => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}
