//! The web endpoints' ingress through its router (no network, no nodes): addressing by path
//! and by host (with app names that hold `--`), tokens and roles, and what a request gets
//! when no container can take it: held up to its deadline, then a timeout; refused with
//! 429 beyond `max_pending`.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use gantry_coordinator::functions::FunctionService;
use gantry_coordinator::functions::service::WebWaitError;
use gantry_coordinator::ingress::Ingress;
use gantry_coordinator::nodes::Nodes;
use gantry_coordinator::store::Store;
use gantry_coordinator::store::tokens::Role;
use gantry_shared::AppName;
use gantry_shared::functions::AppManifest;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Fixture {
    router: axum::Router,
    functions: FunctionService,
    admin: String,
    reader: String,
    _outbound: tokio::sync::mpsc::UnboundedReceiver<gantry_coordinator::functions::Outbound>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let tokens = store.api_tokens().expect("tokens");
    let admin = tokens.bootstrap_admin().expect("bootstrap").expect("admin");
    let reader = tokens.create(Role::Reader, "dashboard").expect("token");
    let nodes = Nodes::default();
    let (functions, outbound) = FunctionService::open(
        store.functions().expect("function store"),
        nodes.changed.clone(),
        CancellationToken::new(),
    )
    .expect("function service");
    for (app, extra) in [("site", ""), ("a--b", "")] {
        let manifest: AppManifest = toml::from_str(&format!(
            r#"
app = "{app}"
[functions.www]
image = "busybox"
startup_timeout = "1s"
[functions.www.web]
{extra}
[functions.open_door]
image = "busybox"
[functions.open_door.web]
public = true
max_pending = 1
"#
        ))
        .expect("manifest");
        functions.deploy(manifest).expect("deploy");
    }
    let router = Ingress::new(
        functions.clone(),
        nodes,
        tokens,
        Some("fn.example.com".into()),
    )
    .router();
    Fixture {
        router,
        functions,
        admin,
        reader,
        _outbound: outbound,
        _dir: dir,
    }
}

async fn send(router: &axum::Router, req: Request<Body>) -> (StatusCode, String, Option<String>) {
    let r = router.clone().oneshot(req).await.expect("response");
    let status = r.status();
    let retry = r
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = axum::body::to_bytes(r.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&body).into_owned(), retry)
}

fn get(uri: &str, host: Option<&str>, token: Option<&str>) -> Request<Body> {
    let mut req = Request::get(uri);
    if let Some(h) = host {
        req = req.header(header::HOST, h);
    }
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    req.body(Body::empty()).expect("request")
}

/// Requests waiting for a container of `app`'s `open_door`.
async fn waiting(functions: &FunctionService, app: &AppName) -> u32 {
    functions
        .app(app)
        .expect("app view")
        .functions
        .iter()
        .find(|v| v.name.as_str() == "open_door")
        .map_or(0, |v| v.queued)
}

#[tokio::test]
async fn endpoints_are_found_by_path_and_by_host() {
    let f = fixture();
    let app = |s: &str| AppName::new(s).expect("app");
    // By path, and the label made from the function's name.
    assert!(f.functions.web_endpoint(&app("site"), "www").is_some());
    assert!(
        f.functions
            .web_endpoint(&app("site"), "open-door")
            .is_some()
    );
    assert!(
        f.functions
            .web_endpoint(&app("site"), "open_door")
            .is_none()
    );
    for (uri, host) in [
        ("/nothing/www/", None),
        ("/site/nope/", None),
        ("/", None),
        ("/x", Some("site--nope.fn.example.com")),
        ("/x", Some("site.fn.example.com")),
    ] {
        let (status, body, _) = send(&f.router, get(uri, host, Some(&f.admin))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri} {host:?}: {body}");
        assert!(body.contains("/APP/LABEL/"), "{body}");
    }
    // A token is needed unless the endpoint is public; a reader's is not enough.
    let (status, body, _) = send(&f.router, get("/site/www/", None, None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body, _) = send(&f.router, get("/site/www/", None, Some("gat_wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body, _) = send(&f.router, get("/site/www/", None, Some(&f.reader))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("submitter"), "{body}");

    // By host: an app whose name holds `--` is found too (every split is tried). With no
    // container and none coming (no nodes), the public endpoint's request is held; the
    // next is beyond its max_pending of 1: 429 at once, with Retry-After.
    for host in [
        "site--open-door.fn.example.com",
        "a--b--open-door.fn.example.com:7081",
    ] {
        let router = f.router.clone();
        let held = tokio::spawn(async move { send(&router, get("/x", Some(host), None)).await });
        let owner = app(host.split("--open").next().unwrap_or_default());
        tokio::time::timeout(Duration::from_secs(5), async {
            while waiting(&f.functions, &owner).await == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the first request waits");
        let refused = tokio::time::timeout(
            Duration::from_secs(5),
            send(&f.router, get("/x", Some(host), None)),
        )
        .await
        .expect("a second request is refused at once while the first waits");
        assert_eq!(
            refused.0,
            StatusCode::TOO_MANY_REQUESTS,
            "{host}: {}",
            refused.1
        );
        assert_eq!(refused.2.as_deref(), Some("1"), "{host}: Retry-After");
        assert!(refused.1.contains("wait for a container"), "{}", refused.1);
        assert!(
            !held.is_finished(),
            "{host}: the first request waits for a container"
        );
        held.abort();
    }
}

#[tokio::test]
async fn a_request_no_container_takes_gives_up_at_its_deadline() {
    let f = fixture();
    let endpoint = f
        .functions
        .web_endpoint(&AppName::new("site").expect("app"), "www")
        .expect("endpoint");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    let waited = tokio::time::Instant::now();
    let result = f
        .functions
        .web_acquire(&endpoint, f.functions.now_ms(), deadline, &[])
        .await;
    assert!(
        matches!(result, Err(WebWaitError::Timeout)),
        "no container: a timeout (504 at the ingress)"
    );
    assert!(
        waited.elapsed() >= Duration::from_millis(300),
        "held until its deadline"
    );
    // The wait was counted as demand while it lasted, and is no more.
    let view = f
        .functions
        .app(&AppName::new("site").expect("app"))
        .expect("app view");
    let www = view
        .functions
        .iter()
        .find(|v| v.name.as_str() == "www")
        .expect("www");
    assert_eq!(www.queued, 0, "a request that gave up is no longer waiting");
}
