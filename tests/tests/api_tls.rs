//! TLS on the HTTP API and the embedded registry, across real processes.
//!
//! A coordinator serving a certificate from operator files (a test CA made here) answers
//! the CLI that trusts that CA; a CLI that does not is told what to set, and plain HTTP on
//! the TLS port is told to use https. In a cluster whose coordinator has the cluster CA
//! issue its API certificate, the CLI imports an image over HTTPS and an agent pulls it
//! from the embedded registry over HTTPS (trusting the CA it got at join) and runs it.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use gantry_tests::cluster::{ClusterSpec, TestCluster};
use gantry_tests::{Proc, binary, field, free_ports};

/// A test CA and a server certificate it signed for 127.0.0.1, as PEM files in `dir`:
/// `ca.pem`, `api.crt` (leaf, then the CA), `api.key`.
fn operator_certificate(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("certificate");
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).expect(name);
    write("ca.pem", ca_cert.pem());
    write("api.crt", cert.pem() + &ca_cert.pem());
    write("api.key", key.serialize_pem());
}

/// `gantry ARGS` against `addr`, with `ca` as GANTRY_CA, and no CLI config file.
fn gantry(dir: &Path, addr: &str, token: &str, ca: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(binary("gantry"));
    cmd.env("XDG_CONFIG_HOME", dir.join("xdg"))
        .env_remove("GANTRY_CA")
        .env("GANTRY_ADDR", addr)
        .env("GANTRY_TOKEN", token)
        .args(args)
        .stdin(Stdio::null());
    if let Some(ca) = ca {
        cmd.env("GANTRY_CA", ca);
    }
    cmd.output().expect("gantry")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn operator_certificate_files_serve_https_to_clients_that_trust_their_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    operator_certificate(d);
    let (api, control) = free_ports();
    let coordinator = |config: &str| {
        std::fs::write(d.join("coordinator.toml"), config).expect("config");
        let mut cmd = Command::new(binary("gantry-coordinator"));
        cmd.env("GANTRY_CONFIG", d.join("coordinator.toml"))
            .args([
                "serve",
                "--gossip-listen",
                "127.0.0.1:0",
                "--api-listen",
                &api,
                "--ingress-listen",
                "127.0.0.1:0",
            ])
            .args(["--control-listen", &control, "--state-dir"])
            .arg(d.join("state"));
        cmd
    };

    // Half a pair, or a file that is not there, stops the start with the file and key.
    let half = coordinator(&format!(
        "[api]\ntls_cert = \"{}\"\n",
        d.join("api.crt").display()
    ))
    .output()
    .expect("coordinator");
    assert!(!half.status.success());
    let e = String::from_utf8_lossy(&half.stderr);
    assert!(
        e.contains("coordinator.toml") && e.contains("`tls_cert` is set without `tls_key`"),
        "{e}"
    );
    let missing = format!(
        "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        d.join("api.crt").display(),
        d.join("nope.key").display()
    );
    let out = coordinator(&missing).output().expect("coordinator");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("nope.key") && e.contains("`api.tls_key`"), "{e}");

    let config = format!(
        "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        d.join("api.crt").display(),
        d.join("api.key").display()
    );
    let mut proc = Proc::spawn(coordinator(&config));
    let lines = proc.lines_until("control listening on");
    let url = field(&lines, "api listening on").expect("api");
    assert_eq!(
        url,
        format!("https://{api}"),
        "the startup line names the scheme"
    );
    let admin = field(&lines, "admin token (shown once, store it safely):").expect("admin");
    let ca = d.join("ca.pem");

    // The CLI that trusts the CA works.
    let out = gantry(d, &url, &admin, Some(&ca), &["jobs", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = gantry(d, &url, &admin, Some(&ca), &["image", "list"]);
    assert!(out.status.success(), "the registry too: {}", text(&out));
    let token = Command::new(binary("gantry-coordinator"))
        .args([
            "token", "create", "--ttl", "5m", "--api", &url, "--token", &admin,
        ])
        .env("GANTRY_CA", &ca)
        .output()
        .expect("token create");
    assert!(token.status.success(), "{}", text(&token));

    // One that does not is told what to set.
    let fails_saying = |out: Output, says: &[&str]| {
        let e = String::from_utf8_lossy(&out.stderr);
        let told = says.iter().all(|s| e.contains(s));
        assert!(!out.status.success() && told, "{}", text(&out));
    };
    let untrusted = gantry(d, &url, &admin, None, &["jobs", "list"]);
    fails_saying(untrusted, &["does not trust", "set GANTRY_CA"]);

    // Plain HTTP to the TLS port is told to use https, by the CLI and by any client.
    let plain = gantry(d, &api, &admin, Some(&ca), &["jobs", "list"]);
    fails_saying(plain, &["HTTPS only", "https://"]);
    let plain = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
        .get(format!("http://{api}/v1/jobs"))
        .bearer_auth(&admin)
        .send()
        .expect("an answer, not a dropped connection");
    assert_eq!(plain.status(), 400);
}

#[test]
fn agents_pull_from_the_embedded_registry_over_https() {
    let c = TestCluster::start(ClusterSpec {
        agents: 1,
        api_tls: true,
        ..ClusterSpec::default()
    });
    assert!(c.api.starts_with("https://"), "{}", c.api);
    let rootfs = c.dir.path().join("tls-rootfs");
    gantry_tests::busybox_rootfs(&rootfs);
    let out = c.gantry(&[
        "image",
        "import",
        rootfs.to_str().expect("utf-8"),
        "--name",
        "tlsbox",
    ]);
    assert!(out.status.success(), "import over https: {}", text(&out));
    // The agent has no such image: it pulls it from the embedded registry, which serves
    // HTTPS only, verified with the cluster CA from its join.
    let out = c.gantry(&[
        "run",
        "--image",
        "tlsbox",
        "--cpu",
        "0.1",
        "--memory",
        "64M",
        "--",
        "echo",
        "pulled-over-https",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pulled-over-https"),
        "{}",
        text(&out)
    );
}
