//! The HTTP API through its router (no network): auth and roles, validation with field
//! names, size limits, idempotency, paging, cancel, OpenAPI and metrics (the gossip drop
//! counters included).

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gantry_coordinator::api::{self, ApiConfig, ApiState};
use gantry_coordinator::images::{ImageCheck, PushTo};
use gantry_coordinator::nodes::service::NodeService;
use gantry_coordinator::registry::RegistryState;
use gantry_coordinator::store::tokens::Role;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Api {
    router: axum::Router,
    /// Where the coordinator's gossip member listens (UDP, 127.0.0.1).
    gossip: std::net::SocketAddr,
    /// Where the function service's messages to nodes go (no nodes here).
    _outbound: tokio::sync::mpsc::UnboundedReceiver<gantry_coordinator::functions::Outbound>,
    admin: String,
    submitter: String,
    reader: String,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let support::Services {
            store,
            join,
            nodes,
            node_admin,
            cluster,
            jobs,
            functions,
            outbound,
        } = support::services(dir.path()).await;
        let tokens = store.api_tokens().expect("tokens");
        let admin = tokens.bootstrap_admin().expect("bootstrap").expect("admin");
        let submitter = tokens.create(Role::Submitter, "ci").expect("token");
        let reader = tokens.create(Role::Reader, "dashboard").expect("token");
        let cfg = ApiConfig {
            max_body_bytes: 4096,
            ..ApiConfig::default()
        };
        let gossip = cluster.gossip_addr();
        // No nodes here: every short image name is accepted (nobody can tell).
        let images = ImageCheck::new(
            RegistryState::open(&dir.path().join("registry"), tokens.clone()).expect("registry"),
            cluster.clone(),
            PushTo {
                address: "127.0.0.1:7080".into(),
                tls: false,
            },
        );
        let node_service = NodeService::new(store, cluster, nodes, node_admin);
        let router = api::router(ApiState::new(
            jobs,
            functions,
            node_service,
            images,
            tokens,
            join,
            cfg,
        ));
        Self {
            router,
            gossip,
            _outbound: outbound,
            admin,
            submitter,
            reader,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .header("content-type", "application/json")
            .body(body.map(Body::from).unwrap_or_else(Body::empty))
            .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("response");
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .expect("body");
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, headers, value)
    }

    async fn submit(&self, spec: Value) -> (StatusCode, Value) {
        let (s, _, v) = self
            .call(
                "POST",
                "/v1/jobs",
                Some(&self.submitter),
                Some(spec.to_string()),
                &[],
            )
            .await;
        (s, v)
    }
}

fn spec(name: &str) -> Value {
    json!({"name": name, "image": "busybox", "command": ["echo", "hi"], "resources": {"cpu": "0.5", "memory": "256M"}})
}

#[tokio::test]
async fn health_and_openapi_need_no_token() {
    let api = Api::new().await;
    let (s, _, v) = api.call("GET", "/healthz", None, None, &[]).await;
    assert_eq!((s, v), (StatusCode::OK, Value::String("ok".into())));
    let (s, _, doc) = api.call("GET", "/v1/openapi.json", None, None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["paths"]["/v1/jobs"]["post"].is_object(), "{doc}");
    assert!(doc["paths"]["/v1/calls/{id}/stream"]["get"].is_object());
    assert!(doc["components"]["schemas"]["StreamPage"].is_object());
    assert!(doc["components"]["schemas"]["JobSpec"].is_object());
}

#[tokio::test]
async fn tokens_and_roles_are_enforced() {
    let api = Api::new().await;
    let body = Some(spec("a").to_string());
    assert_eq!(
        api.call("POST", "/v1/jobs", None, body.clone(), &[])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call("POST", "/v1/jobs", Some("gat_wrong"), body.clone(), &[])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let (s, _, v) = api
        .call("POST", "/v1/jobs", Some(&api.reader), body.clone(), &[])
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "forbidden");
    let (s, _, job) = api
        .call("POST", "/v1/jobs", Some(&api.admin), body, &[])
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(job["state"], "pending");
    let path = format!("/v1/jobs/{}", job["id"].as_str().expect("id"));
    assert_eq!(
        api.call("GET", &path, Some(&api.reader), None, &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        api.call(
            "POST",
            &format!("{path}/cancel"),
            Some(&api.reader),
            None,
            &[]
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn bad_bodies_name_the_field() {
    let api = Api::new().await;
    let cases = [
        ("{not json".to_owned(), None),
        (json!({"name": "x", "image": "busybox", "gpus": 2}).to_string(), None),
        (json!({"name": "x", "image": "busybox", "resources": {"cpu": "1", "memory": "1G", "gpus": "two"}}).to_string(), Some("resources.gpus")),
        (json!({"name": "x", "image": "busybox", "resources": {"cpu": "1", "memory": "0"}}).to_string(), Some("resources.memory")),
        (json!({"name": "x", "image": "", "nodes": 1}).to_string(), Some("image")),
        (json!({"name": "x", "image": "busybox", "timeout": "soon"}).to_string(), Some("timeout")),
        (json!({"name": "a\u{0}b", "image": "busybox"}).to_string(), Some("name")),
        (json!({"name": "x".repeat(200), "image": "busybox"}).to_string(), Some("name")),
        (json!({"name": "x", "image": "busybox", "resources": {"cpu": "1", "memory": "1G", "gpu_types": vec!["H100"; 17]}}).to_string(), Some("resources.gpu_types")),
    ];
    for (body, field) in cases {
        let (s, _, v) = api
            .call(
                "POST",
                "/v1/jobs",
                Some(&api.submitter),
                Some(body.clone()),
                &[],
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty());
        if let Some(f) = field {
            assert_eq!(v["error"]["field"], f, "{body}: {v}");
        }
    }
    // The unknown field is named in the message.
    let (_, _, v) = api
        .call(
            "POST",
            "/v1/jobs",
            Some(&api.submitter),
            Some(json!({"name": "x", "image": "b", "gpus": 2}).to_string()),
            &[],
        )
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("gpus"),
        "{v}"
    );
    // Over the body limit (4 KiB in this test).
    let big = json!({"name": "x", "image": "busybox", "command": ["x".repeat(8192)]}).to_string();
    let (s, _, v) = api
        .call("POST", "/v1/jobs", Some(&api.submitter), Some(big), &[])
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
    );
    // Nothing was stored by any of them.
    let (_, _, list) = api
        .call("GET", "/v1/jobs", Some(&api.reader), None, &[])
        .await;
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(0));
}

#[tokio::test]
async fn idempotency_keys_make_retries_safe() {
    let api = Api::new().await;
    let key = [("idempotency-key", "retry-me")];
    let body = Some(spec("a").to_string());
    let (s1, h1, j1) = api
        .call("POST", "/v1/jobs", Some(&api.submitter), body.clone(), &key)
        .await;
    // Same meaning, different formatting: still a replay.
    let reformatted = Some(serde_json::to_string_pretty(&spec("a")).expect("json"));
    let (s2, h2, j2) = api
        .call("POST", "/v1/jobs", Some(&api.submitter), reformatted, &key)
        .await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(j1["id"], j2["id"]);
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(
        h2.get("idempotent-replayed")
            .map(|v| v.to_str().unwrap_or("")),
        Some("true")
    );
    let (s3, _, v) = api
        .call(
            "POST",
            "/v1/jobs",
            Some(&api.submitter),
            Some(spec("b").to_string()),
            &key,
        )
        .await;
    assert_eq!(s3, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["code"], "idempotency_key_reused");
}

#[tokio::test]
async fn jobs_page_filter_and_cancel() {
    let api = Api::new().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (s, job) = api.submit(spec(&format!("j{i}"))).await;
        assert_eq!(s, StatusCode::CREATED);
        ids.push(job["id"].as_str().expect("id").to_owned());
    }
    let (_, _, page1) = api
        .call("GET", "/v1/jobs?limit=2", Some(&api.reader), None, &[])
        .await;
    assert_eq!(page1["jobs"].as_array().map(Vec::len), Some(2));
    let token = page1["next_page_token"]
        .as_str()
        .expect("more pages")
        .to_owned();
    let (_, _, page2) = api
        .call(
            "GET",
            &format!("/v1/jobs?limit=2&page_token={token}"),
            Some(&api.reader),
            None,
            &[],
        )
        .await;
    assert_eq!(page2["jobs"][0]["id"], ids[2].as_str());
    assert!(page2["next_page_token"].is_null());

    let (s, _, job) = api
        .call(
            "POST",
            &format!("/v1/jobs/{}/cancel", ids[0]),
            Some(&api.submitter),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (s, job["state"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    let (_, _, pending) = api
        .call(
            "GET",
            "/v1/jobs?state=pending",
            Some(&api.reader),
            None,
            &[],
        )
        .await;
    assert_eq!(pending["jobs"].as_array().map(Vec::len), Some(2));
    let (s, _, _) = api
        .call("GET", "/v1/jobs?state=bogus", Some(&api.reader), None, &[])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    for missing in ["/v1/jobs/j-ffffffffffffffff", "/v1/jobs/NOT_AN_ID"] {
        let (s, _, v) = api.call("GET", missing, Some(&api.reader), None, &[]).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{missing}"
        );
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_without_ids() {
    let api = Api::new().await;
    let (_, job) = api.submit(spec("m")).await;
    let id = job["id"].as_str().expect("id").to_owned();
    api.call(
        "GET",
        &format!("/v1/jobs/{id}"),
        Some(&api.reader),
        None,
        &[],
    )
    .await;
    let (s, _, text) = api.call("GET", "/metrics", None, None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let text = text.as_str().expect("text").to_owned();
    assert!(text.contains("gantry_jobs_submitted_total 1"), "{text}");
    assert!(text.contains(r#"route="/v1/jobs/{id}""#), "{text}");
    assert!(!text.contains(&id), "no job ids in metrics: {text}");
}

#[tokio::test]
async fn metrics_count_gossip_datagrams_that_do_not_authenticate() {
    let api = Api::new().await;
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // A datagram of the right length signed with nothing, and one too short to be signed.
    stranger
        .send_to(&[0u8; 100], api.gossip)
        .await
        .expect("send");
    stranger.send_to(b"hi", api.gossip).await.expect("send");
    let scrape = async || {
        let (s, _, text) = api.call("GET", "/metrics", None, None, &[]).await;
        assert_eq!(s, StatusCode::OK);
        text.as_str().expect("text").to_owned()
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = scrape().await;
        let line = |l: &str| text.lines().any(|t| t == l);
        if line(r#"gantry_gossip_datagrams_dropped_total{reason="bad_mac"} 1"#)
            && line(r#"gantry_gossip_datagrams_dropped_total{reason="short"} 1"#)
        {
            assert!(
                line(r#"gantry_gossip_datagrams_dropped_total{reason="stale"} 0"#),
                "{text}"
            );
            assert!(
                text.lines()
                    .any(|l| l.starts_with("gantry_gossip_sent_bytes_total ")),
                "{text}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn admins_create_join_tokens() {
    let api = Api::new().await;
    let body = Some(json!({"ttl": "1h"}).to_string());
    assert_eq!(
        api.call(
            "POST",
            "/v1/join-tokens",
            Some(&api.submitter),
            body.clone(),
            &[]
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    let (s, _, v) = api
        .call("POST", "/v1/join-tokens", Some(&api.admin), body, &[])
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let token = v["token"].as_str().expect("token");
    assert!(
        gantry_shared::protocol::JoinToken::parse(token).is_ok(),
        "{token}"
    );
    let (s, _, v) = api
        .call(
            "POST",
            "/v1/join-tokens",
            Some(&api.admin),
            Some(json!({"ttl": "forever"}).to_string()),
            &[],
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("ttl"))
    );
}

#[tokio::test]
async fn admins_create_role_tokens_that_work() {
    let api = Api::new().await;
    let body = Some(json!({"role": "reader", "name": "grafana"}).to_string());
    assert_eq!(
        api.call(
            "POST",
            "/v1/tokens",
            Some(&api.submitter),
            body.clone(),
            &[]
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    let (s, _, v) = api
        .call("POST", "/v1/tokens", Some(&api.admin), body, &[])
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let token = v["token"].as_str().expect("token").to_owned();
    assert_eq!(
        api.call("GET", "/v1/jobs", Some(&token), None, &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        api.call(
            "POST",
            "/v1/jobs",
            Some(&token),
            Some(spec("x").to_string()),
            &[]
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    let (s, _, v) = api
        .call(
            "POST",
            "/v1/tokens",
            Some(&api.admin),
            Some(json!({"role": "root", "name": "x"}).to_string()),
            &[],
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("role"))
    );
}

fn manifest(app: &str, extra: &str) -> String {
    let text = format!("app = \"{app}\"\n[functions.echo]\nimage = \"busybox\"\n{extra}\n");
    let m: gantry_shared::functions::AppManifest = toml::from_str(&text).expect("manifest");
    serde_json::to_string(&m).expect("json")
}

#[tokio::test]
async fn deployments_make_versions_and_bad_manifests_name_function_and_field() {
    let api = Api::new().await;
    let sub = Some(api.submitter.as_str());
    let (s, _, v) = api
        .call(
            "POST",
            "/v1/apps/embed/deployments",
            sub,
            Some(manifest("embed", "")),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["version"], 1);
    let (s, _, v) = api
        .call(
            "POST",
            "/v1/apps/embed/deployments",
            sub,
            Some(manifest("embed", "max_inputs = 2")),
            &[],
        )
        .await;
    assert_eq!((s, v["version"].clone()), (StatusCode::CREATED, json!(2)));
    let (s, _, v) = api
        .call("GET", "/v1/apps/embed", Some(&api.reader), None, &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["active_version"], 2);
    assert_eq!(v["versions"].as_array().map(Vec::len), Some(2));
    // A wrong field is named with its function.
    let bad = manifest("embed", "").replace("\"max_containers\":10", "\"max_containers\":0");
    let (s, _, v) = api
        .call("POST", "/v1/apps/embed/deployments", sub, Some(bad), &[])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["field"], "functions.echo.max_containers", "{v}");
    // An unknown field is named by its path.
    let typo = manifest("embed", "").replace("\"max_inputs\"", "\"max_input\"");
    let (s, _, v) = api
        .call("POST", "/v1/apps/embed/deployments", sub, Some(typo), &[])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("max_input"),
        "{v}"
    );
    // The manifest's app must be the path's.
    let (s, _, _) = api
        .call(
            "POST",
            "/v1/apps/other/deployments",
            sub,
            Some(manifest("embed", "")),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Readers may not deploy.
    let (s, _, _) = api
        .call(
            "POST",
            "/v1/apps/embed/deployments",
            Some(&api.reader),
            Some(manifest("embed", "")),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Rollback points calls at version 1.
    let (s, _, v) = api
        .call("POST", "/v1/apps/embed/rollback", sub, None, &[])
        .await;
    assert_eq!(
        (s, v["active_version"].clone()),
        (StatusCode::OK, json!(1)),
        "{v}"
    );
}

#[tokio::test]
async fn calls_are_durable_queued_and_cancellable_and_refused_clearly() {
    let api = Api::new().await;
    let sub = Some(api.submitter.as_str());
    let path = "/v1/apps/embed/functions/echo/calls";
    // No such app.
    let one = json!({"input": {"text": "hi"}, "wait": false}).to_string();
    let (s, _, v) = api.call("POST", path, sub, Some(one.clone()), &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("gantry deploy"),
        "{v}"
    );
    let two = manifest("embed", "[functions.echo2]\nimage = \"busybox\"");
    api.call("POST", "/v1/apps/embed/deployments", sub, Some(two), &[])
        .await;
    // No such function: the error lists what the version has.
    let (s, _, v) = api
        .call(
            "POST",
            "/v1/apps/embed/functions/nope/calls",
            sub,
            Some(one.clone()),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("echo"),
        "{v}"
    );
    // An async call answers at once with its id; with no node its input stays queued.
    let (s, _, v) = api
        .call(
            "POST",
            path,
            sub,
            Some(one.clone()),
            &[("idempotency-key", "k1")],
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().expect("call id").to_owned();
    assert_eq!(v["results"][0]["state"], "queued");
    // Replayed with the same key: the same call.
    let (s, h, v) = api
        .call(
            "POST",
            path,
            sub,
            Some(one.clone()),
            &[("idempotency-key", "k1")],
        )
        .await;
    assert_eq!(
        (s, v["id"].as_str()),
        (StatusCode::ACCEPTED, Some(id.as_str()))
    );
    assert_eq!(
        h.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    // The same key and body for another function is another request: refused.
    let (s, _, v) = api
        .call(
            "POST",
            "/v1/apps/embed/functions/echo2/calls",
            sub,
            Some(one.clone()),
            &[("idempotency-key", "k1")],
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, _, app) = api
        .call("GET", "/v1/apps/embed", Some(&api.reader), None, &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let echo = app["functions"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["name"] == "echo"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(echo["queued"], 1, "{app}");
    assert_eq!(echo["desired"], 1, "{app}");
    // Cancel: the queued input ends cancelled.
    let (s, _, v) = api
        .call("POST", &format!("/v1/calls/{id}/cancel"), sub, None, &[])
        .await;
    assert_eq!(
        (s, v["state"].clone()),
        (StatusCode::OK, json!("cancelled")),
        "{v}"
    );
    let (_, _, v) = api
        .call(
            "GET",
            &format!("/v1/calls/{id}"),
            Some(&api.reader),
            None,
            &[],
        )
        .await;
    assert_eq!(v["results"][0]["state"], "cancelled", "{v}");
    // Cancelling it again changes nothing.
    let (s, _, again) = api
        .call("POST", &format!("/v1/calls/{id}/cancel"), sub, None, &[])
        .await;
    assert_eq!(
        (s, again["state"].clone()),
        (StatusCode::OK, json!("cancelled"))
    );
    // Bad requests say what is wrong.
    let (s, _, v) = api.call("POST", path, sub, Some("{}".into()), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("no input"),
        "{v}"
    );
    let both = json!({"input": {"text": "a", "base64": "YQ=="}}).to_string();
    let (s, _, _) = api.call("POST", path, sub, Some(both), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Over 2 MiB inline: 413 saying so (the call route takes bodies beyond the API's limit).
    let big = json!({"input": {"text": "x".repeat((2 << 20) + 1)}, "wait": false}).to_string();
    let (s, _, v) = api.call("POST", path, sub, Some(big), &[]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("inline"),
        "{v}"
    );
    // A stopped app refuses calls with what to do.
    let (s, _, _) = api
        .call("POST", "/v1/apps/embed/stop", sub, None, &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, v) = api.call("POST", path, sub, Some(one), &[]).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("rollback"),
        "{v}"
    );
}

#[tokio::test]
async fn an_open_map_takes_inputs_in_order_holds_back_beyond_its_bound_and_reads_in_both_orders() {
    let api = std::sync::Arc::new(Api::new().await);
    let sub = Some(api.submitter.as_str());
    let m = manifest("maps", "");
    api.call("POST", "/v1/apps/maps/deployments", sub, Some(m), &[])
        .await;
    let texts = |from: usize, n: usize| -> Vec<Value> {
        (from..from + n)
            .map(|i| json!({"text": format!("in-{i}")}))
            .collect()
    };
    // Open with three inputs (no node: they stay queued).
    let open = json!({"inputs": texts(0, 3), "open": true, "wait": false}).to_string();
    let (s, _, v) = api
        .call(
            "POST",
            "/v1/apps/maps/functions/echo/calls",
            sub,
            Some(open),
            &[],
        )
        .await;
    assert_eq!((s, &v["open"]), (StatusCode::ACCEPTED, &json!(true)), "{v}");
    let id = v["id"].as_str().expect("id").to_owned();
    let inputs = format!("/v1/calls/{id}/inputs");
    let append = |start: u32, body: Vec<Value>, close: bool| {
        json!({"start": start, "inputs": body, "close": close}).to_string()
    };
    // Two more at their place; sent again, the same answer and nothing added.
    for replay in [false, true] {
        let (s, h, v) = api
            .call(
                "POST",
                &inputs,
                sub,
                Some(append(3, texts(3, 2), false)),
                &[],
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            (v["inputs"].as_u64(), v["outstanding"].as_u64()),
            (Some(5), Some(5))
        );
        assert_eq!(h.contains_key("idempotent-replayed"), replay);
    }
    // A gap, or other inputs where some already are: 409 naming the next `start`.
    for (start, body) in [(7, texts(7, 1)), (4, texts(90, 2)), (u32::MAX, texts(0, 2))] {
        let (s, _, v) = api
            .call("POST", &inputs, sub, Some(append(start, body, false)), &[])
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains("`start` 5"), "{msg}");
    }
    // More than the bound in one request: refused at once.
    let (s, _, v) = api
        .call(
            "POST",
            &inputs,
            sub,
            Some(append(5, texts(5, 1_001), false)),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Fill the map to its bound of 1,000 outstanding; one more waits for room.
    let (s, _, v) = api
        .call(
            "POST",
            &inputs,
            sub,
            Some(append(5, texts(5, 995), false)),
            &[],
        )
        .await;
    assert_eq!(
        (s, v["outstanding"].as_u64()),
        (StatusCode::OK, Some(1_000)),
        "{v}"
    );
    let waiting = {
        let (api, inputs) = (api.clone(), inputs.clone());
        tokio::spawn(async move {
            let sub = Some(api.submitter.as_str());
            api.call(
                "POST",
                &inputs,
                sub,
                Some(append(1_000, texts(1_000, 1), false)),
                &[],
            )
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "an append beyond the bound waits for room"
    );
    // No input streamed anything yet: its stream is empty and not done, at once and after
    // a short wait; an index past the call's inputs is 404, a bad wait 400.
    let empty = serde_json::json!({"chunks": [], "next": 0, "done": false});
    for (query, status) in [
        ("index=3", StatusCode::OK),
        ("index=3&from=0&wait=200ms", StatusCode::OK),
        ("index=1000", StatusCode::NOT_FOUND),
        ("wait=soon", StatusCode::BAD_REQUEST),
    ] {
        let path = format!("/v1/calls/{id}/stream?{query}");
        let (s, _, v) = api.call("GET", &path, Some(&api.reader), None, &[]).await;
        assert_eq!(s, status, "{query}: {v}");
        if s == StatusCode::OK {
            assert_eq!(v, empty);
        }
    }
    // Nothing has ended yet: reading outputs from the start finds none, without waiting.
    let (s, _, v) = api
        .call(
            "GET",
            &format!("/v1/calls/{id}/outputs"),
            Some(&api.reader),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["results"].as_array().map(Vec::len),
            &v["next"],
            &v["done"]
        ),
        (Some(0), &json!(0), &json!(false))
    );
    // Cancelling closes the map: the waiting append hears so, every input ends.
    let (s, _, v) = api
        .call("POST", &format!("/v1/calls/{id}/cancel"), sub, None, &[])
        .await;
    assert_eq!(
        (s, &v["state"], &v["open"]),
        (StatusCode::OK, &json!("cancelled"), &json!(false)),
        "{v}"
    );
    let (s, _, v) = waiting.await.expect("append");
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("cancelled"),
        "{v}"
    );
    // Both orders page through all 1,000, and the last page says done.
    for order in ["input", "completion"] {
        let mut from = 0;
        let mut seen = Vec::new();
        loop {
            let (s, _, v) = api
                .call(
                    "GET",
                    &format!("/v1/calls/{id}/outputs?from={from}&order={order}&limit=300&wait=1s"),
                    Some(&api.reader),
                    None,
                    &[],
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let page = v["results"].as_array().cloned().unwrap_or_default();
            assert!(page.len() <= 300);
            seen.extend(page.iter().map(|r| r["index"].as_u64().unwrap_or(u64::MAX)));
            assert!(page.iter().all(|r| r["state"] == "cancelled"), "{v}");
            from = v["next"].as_u64().expect("next");
            if v["done"] == json!(true) {
                break;
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..1_000).collect::<Vec<u64>>(), "{order}");
    }
    // A closed map takes nothing more.
    let (s, _, v) = api
        .call(
            "POST",
            &inputs,
            sub,
            Some(append(1_000, texts(1_000, 1), false)),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}
