//! echo-runtime: a Gantry function runtime in plain Rust, the standard library only.
//!
//! It is the reference for writing a runtime in any language: everything a function
//! container has to do is here, over a hand-written HTTP/1.1 client, so it reads as the
//! contract itself (docs/functions.md describes it).
//!
//! 1. Read `GANTRY_RUNTIME_API` (the unix socket the agent serves) and `GANTRY_MAX_INPUTS`.
//! 2. Do the setup (load a model, open files…), then `POST /v1/ready`; or, when the setup
//!    failed, `POST /v1/init/error` and exit non-zero.
//! 3. Run `GANTRY_MAX_INPUTS` workers, each looping on `GET /v1/inputs/next` and answering
//!    every input with `POST /v1/inputs/{id}/response` or `/error`.
//! 4. When `next` answers `410 Gone`, finish what is held and exit 0.
//!
//! One connection per request, with `Connection: close`: the response ends at EOF, so the
//! client needs no keep-alive bookkeeping. The echo behaviour, chosen by the input's text:
//! `fail:MSG` answers an error, `sleep:MS` sleeps then answers `slept MS`, `exit:N` exits the
//! process with code N (a crash), `env:NAME` answers that variable, `file:PATH` answers
//! that file's bytes, `whoami` answers the host name (the container id), `stream:N` streams
//! N chunks `chunk-0`…`chunk-{N-1}` (`text/plain`, `POST /v1/inputs/{id}/stream`) and then
//! answers `streamed N` (fewer once the agent says the input streamed its most, 429);
//! anything else is echoed back with its content type.
//! `ECHO_INIT_ERROR=MESSAGE` makes the setup fail with that message.
//!
//! A web request (an input of kind `http`, from a `via = "runtime_api"` endpoint) gets the
//! same answer as a response, with status 200 (or `NNN` for the path `/status/NNN`) and
//! the headers `x-echo-method`, `x-echo-path` and `x-echo-query`, plus `x-echo-NAME` for
//! each request header `NAME` that starts with `x-`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use std::{env, fs, thread};

/// The agent's runtime API on its unix socket.
#[derive(Clone)]
struct Api {
    socket: PathBuf,
}

/// A parsed HTTP response.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive, as HTTP says).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers_named(name).next()
    }

    /// Every header named `name`, in order.
    fn headers_named<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> {
        let name = name.to_owned();
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(&name))
            .map(|(_, v)| v.as_str())
    }
}

impl Api {
    /// One request on a fresh connection; reads the response to EOF.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> io::Result<Response> {
        self.request_with(method, path, &[], body)
    }

    /// One request with extra header lines (`Name: value` each).
    fn request_with(
        &self,
        method: &str,
        path: &str,
        extra: &[String],
        body: Option<(&str, &[u8])>,
    ) -> io::Result<Response> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "connecting to the runtime API at {}: {e}",
                    self.socket.display()
                ),
            )
        })?;
        let (content_type, bytes) = body.unwrap_or(("application/octet-stream", &[]));
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: gantry\r\nConnection: close\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        );
        for line in extra {
            head.push_str(line);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(bytes)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        parse_response(&raw).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{method} {path}: {e}"))
        })
    }

    /// POSTs `body` and expects a 2xx status; any other is an error naming it.
    fn post(&self, path: &str, content_type: &str, body: &[u8]) -> io::Result<Response> {
        let resp = self.request("POST", path, Some((content_type, body)))?;
        if !(200..300).contains(&resp.status) {
            let text = String::from_utf8_lossy(&resp.body);
            return Err(io::Error::other(format!(
                "POST {path}: {} {}",
                resp.status,
                text.trim()
            )));
        }
        Ok(resp)
    }
}

/// Splits a raw response into status, headers and body (Content-Length, chunked or to EOF).
fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the response has no complete header")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "the response header is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &raw[end + 4..];
    resp.body = if resp
        .header("Transfer-Encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest)?
    } else if let Some(len) = resp.header("Content-Length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        rest.get(..len)
            .ok_or("the body is shorter than its Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(resp)
}

/// Decodes a chunked body: `SIZE-IN-HEX\r\nBYTES\r\n` until a zero size.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line has no end")?;
        let line = String::from_utf8_lossy(&rest[..eol]);
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).ok_or("a chunk is cut short")?);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

/// `{"type", "message", "traceback"}`, the body of `/error` and `/v1/init/error`.
fn error_json(kind: &str, message: &str) -> Vec<u8> {
    format!(
        r#"{{"type":{},"message":{},"traceback":""}}"#,
        json_string(kind),
        json_string(message)
    )
    .into_bytes()
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What the echo function answers to one input.
enum Answer {
    Output(String, Vec<u8>),
    Error(String),
}

/// The function itself: decides the answer from the input's text.
fn run_input(content_type: &str, body: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(body);
    let plain = |s: String| Answer::Output("text/plain".to_owned(), s.into_bytes());
    if let Some(message) = text.strip_prefix("fail:") {
        Answer::Error(message.to_owned())
    } else if let Some(ms) = text.strip_prefix("sleep:") {
        match ms.trim().parse::<u64>() {
            Ok(ms) => {
                thread::sleep(Duration::from_millis(ms));
                plain(format!("slept {ms}"))
            }
            Err(_) => Answer::Error(format!("sleep:{ms}: not a number of milliseconds")),
        }
    } else if let Some(code) = text.strip_prefix("exit:") {
        // A crash on purpose: the input is never answered, and the platform retries it.
        std::process::exit(code.trim().parse().unwrap_or(1));
    } else if let Some(name) = text.strip_prefix("env:") {
        match env::var(name.trim()) {
            Ok(value) => plain(value),
            Err(_) => Answer::Error(format!("environment variable {} is not set", name.trim())),
        }
    } else if let Some(path) = text.strip_prefix("file:") {
        match fs::read(path.trim()) {
            Ok(bytes) => Answer::Output("application/octet-stream".to_owned(), bytes),
            Err(e) => Answer::Error(format!("reading {}: {e}", path.trim())),
        }
    } else if text == "whoami" {
        let from_file = fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned());
        let host = from_file
            .filter(|h| !h.is_empty())
            .or_else(|| env::var("HOSTNAME").ok());
        plain(host.unwrap_or_default())
    } else {
        Answer::Output(content_type.to_owned(), body.to_vec())
    }
}

/// `stream:N`: posts chunks `chunk-0`…`chunk-{N-1}` of input `id` in order, each once the
/// previous one was accepted, then answers how many went. A 429 (the input streamed its
/// most) ends the stream; its answer still works.
fn stream_chunks(api: &Api, id: &str, n: &str) -> io::Result<Answer> {
    let Ok(n) = n.trim().parse::<u64>() else {
        return Ok(Answer::Error(format!("stream:{n}: not a number of chunks")));
    };
    let path = format!("/v1/inputs/{id}/stream");
    let mut sent = 0;
    for i in 0..n {
        let chunk = format!("chunk-{i}");
        let resp = api.request("POST", &path, Some(("text/plain", chunk.as_bytes())))?;
        match resp.status {
            202 => sent += 1,
            429 => break,
            s => {
                return Ok(Answer::Error(format!(
                    "POST {path}: {s} {}",
                    String::from_utf8_lossy(&resp.body).trim()
                )));
            }
        }
    }
    Ok(Answer::Output(
        "text/plain".to_owned(),
        format!("streamed {sent}").into_bytes(),
    ))
}

/// The status and headers answering a web request's input: what the request was.
fn http_answer(input: &Response) -> Vec<String> {
    let path = input.header("Gantry-Http-Path").unwrap_or_default();
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let mut lines = vec![format!("Gantry-Http-Status: {status}")];
    for (name, header) in [
        ("method", "Gantry-Http-Method"),
        ("path", "Gantry-Http-Path"),
        ("query", "Gantry-Http-Query"),
    ] {
        let value = input.header(header).unwrap_or_default();
        lines.push(format!("Gantry-Http-Header: x-echo-{name}: {value}"));
    }
    for line in input.headers_named("Gantry-Http-Header") {
        if let Some((name, value)) = line.split_once(':')
            && name.to_ascii_lowercase().starts_with("x-")
        {
            let name = name.trim().to_ascii_lowercase();
            lines.push(format!(
                "Gantry-Http-Header: x-echo-{name}: {}",
                value.trim()
            ));
        }
    }
    lines
}

/// One worker: takes inputs until the container is drained (`410 Gone`).
fn worker(api: Api) -> io::Result<()> {
    loop {
        let input = api.request("GET", "/v1/inputs/next", None)?;
        match input.status {
            200 => {}
            410 => return Ok(()),
            // Only when this container already holds GANTRY_MAX_INPUTS inputs.
            429 => {
                thread::sleep(Duration::from_millis(100));
                continue;
            }
            s => {
                return Err(io::Error::other(format!(
                    "GET /v1/inputs/next: unexpected status {s}"
                )));
            }
        }
        let Some(id) = input.header("Gantry-Input-Id").map(str::to_owned) else {
            return Err(io::Error::other(
                "GET /v1/inputs/next: no Gantry-Input-Id header",
            ));
        };
        let content_type = input
            .header("Content-Type")
            .unwrap_or("application/octet-stream");
        let text = String::from_utf8_lossy(&input.body);
        let answer = match text.strip_prefix("stream:") {
            Some(n) => stream_chunks(&api, &id, n)?,
            None => run_input(content_type, &input.body),
        };
        let (path, resp) = match answer {
            Answer::Output(ct, out) => {
                let path = format!("/v1/inputs/{id}/response");
                let http = if input.header("Gantry-Input-Kind") == Some("http") {
                    http_answer(&input)
                } else {
                    Vec::new()
                };
                let resp = api.request_with("POST", &path, &http, Some((&ct, &out)))?;
                (path, resp)
            }
            Answer::Error(message) => {
                let path = format!("/v1/inputs/{id}/error");
                let resp = api.request(
                    "POST",
                    &path,
                    Some(("application/json", &error_json("EchoError", &message))),
                )?;
                (path, resp)
            }
        };
        match resp.status {
            202 => {}
            // Cancelled while it ran: nobody wants the answer any more.
            404 => eprintln!("echo-runtime: input {id} is no longer held (cancelled?)"),
            s => eprintln!(
                "echo-runtime: POST {path}: {s} {}",
                String::from_utf8_lossy(&resp.body).trim()
            ),
        }
    }
}

fn main() -> ExitCode {
    let Some(socket) = env::var_os("GANTRY_RUNTIME_API") else {
        eprintln!(
            "echo-runtime: GANTRY_RUNTIME_API is not set; this program runs inside a Gantry \
             function container, where the agent sets it to its runtime API socket"
        );
        return ExitCode::from(2);
    };
    let api = Api {
        socket: PathBuf::from(socket),
    };
    if !api.socket.exists() {
        eprintln!(
            "echo-runtime: the runtime API socket {} does not exist (GANTRY_RUNTIME_API); \
             is this running in a Gantry function container?",
            api.socket.display()
        );
        return ExitCode::from(2);
    }
    let max_inputs = match env::var("GANTRY_MAX_INPUTS").map(|v| v.parse::<usize>()) {
        Ok(Ok(n)) if n > 0 => n,
        Err(_) => 1,
        Ok(_) => {
            eprintln!("echo-runtime: GANTRY_MAX_INPUTS must be a positive integer");
            return ExitCode::from(2);
        }
    };

    // The setup: a real runtime loads its code and model here, and reports a failure.
    if let Ok(message) = env::var("ECHO_INIT_ERROR") {
        if let Err(e) = api.post(
            "/v1/init/error",
            "application/json",
            &error_json("EchoInitError", &message),
        ) {
            eprintln!("echo-runtime: reporting the setup failure: {e}");
        }
        return ExitCode::FAILURE;
    }
    if let Err(e) = api.post("/v1/ready", "text/plain", b"") {
        eprintln!("echo-runtime: {e}");
        return ExitCode::FAILURE;
    }

    // Concurrency is the number of outstanding `next` calls: one per worker.
    let workers: Vec<_> = (0..max_inputs)
        .map(|_| {
            let api = api.clone();
            thread::spawn(move || {
                if let Err(e) = worker(api) {
                    // The agent is gone or broke the contract: exit, and the platform
                    // retries whatever this container held.
                    eprintln!("echo-runtime: {e}");
                    std::process::exit(1);
                }
            })
        })
        .collect();
    for w in workers {
        if w.join().is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
