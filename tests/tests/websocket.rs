//! A real WebSocket through the coordinator's ingress to a real container: the
//! `tests/fixtures/ws-echo` server (tungstenite, static in busybox) as a web endpoint
//! (contract H), spoken to with tungstenite's client. The first connection, made while the
//! function is at zero, is held while its container starts; text and binary messages come
//! back unchanged and a ping gets its pong; the container counts as busy while the socket is
//! open and idle once the close handshake has ended it; a handshake without a token gets 401.

use std::net::TcpStream;
use std::time::Duration;

use gantry_tests::cluster::{ClusterSpec, TestCluster, live_containers};
use gantry_tests::netns::wait_until;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::client::Response;
use tungstenite::http::{HeaderValue, header};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Bytes, Error, Message, WebSocket};

/// The most any read or write on a socket may wait: the first handshake waits for a cold
/// start (as the web tests' HTTP clients do); no step should come near it.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

const MANIFEST: &str = r#"
app = "sockets"
[functions.echo]
image = "ws-echo"
command = ["/app/ws-echo"]
cpu = "0.2"
memory = "64M"
scaledown_window = "60s"
[functions.echo.web]
"#;

/// A WebSocket handshake with the ingress for `path`, with `token` as the bearer token; the
/// socket's reads and writes time out, so nothing can hang.
fn connect(
    c: &TestCluster,
    path: &str,
    token: Option<&str>,
) -> Result<(WebSocket<TcpStream>, Response), Error> {
    let mut request = format!("ws://{}{path}", c.ingress)
        .into_client_request()
        .expect("a WebSocket request");
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("a header value");
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let stream = TcpStream::connect(&c.ingress).expect("connect to the ingress");
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    tungstenite::client(request, stream).map_err(|e| match e {
        HandshakeError::Failure(e) => e,
        HandshakeError::Interrupted(_) => panic!("a blocking handshake was interrupted"),
    })
}

/// Sends `msg` and reads the next message.
fn round_trip(ws: &mut WebSocket<TcpStream>, msg: Message) -> Message {
    ws.send(msg).expect("send a message");
    ws.read().expect("read the answer")
}

#[test]
fn a_websocket_passes_through_the_ingress_and_echoes() {
    let c = TestCluster::start(ClusterSpec {
        agents: 1,
        ws_echo: true,
        ..ClusterSpec::default()
    });
    c.deploy(MANIFEST);
    assert_eq!(
        live_containers(&c.function_view("sockets", "echo")),
        0,
        "nothing runs before a connection"
    );

    // Without a token the handshake is refused by the ingress (and starts nothing).
    match connect(&c, "/sockets/echo/", None) {
        Err(Error::Http(response)) => {
            // The body is what came with the head (tungstenite reads no further).
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            assert_eq!(response.status(), 401, "{body}");
        }
        Ok(_) => panic!("a WebSocket without a token was accepted"),
        Err(e) => panic!("a WebSocket without a token: {e}"),
    }
    assert_eq!(
        live_containers(&c.function_view("sockets", "echo")),
        0,
        "a refused handshake starts no container"
    );

    // The first connection, at zero, is held while the container starts, then upgraded.
    let (mut ws, response) =
        connect(&c, "/sockets/echo/", Some(&c.admin)).expect("the WebSocket handshake");
    assert_eq!(response.status(), 101);

    let text = Message::text("hello through the ingress");
    assert_eq!(round_trip(&mut ws, text.clone()), text, "the text message");
    // Every byte value, and more than one QUIC packet's worth.
    let bytes: Vec<u8> = (0..70_000u32).map(|i| (i % 256) as u8).collect();
    let binary = Message::binary(bytes);
    assert_eq!(
        round_trip(&mut ws, binary.clone()),
        binary,
        "the binary message"
    );
    assert_eq!(
        round_trip(&mut ws, Message::Ping(Bytes::from_static(b"are you there"))),
        Message::Pong(Bytes::from_static(b"are you there")),
        "the ping's pong"
    );

    // An open socket is a request in flight: its container is busy.
    let f = c.function_view("sockets", "echo");
    assert_eq!(
        (f["busy"].as_u64(), f["running"].as_u64()),
        (Some(1), Some(1)),
        "one container busy with the open socket: {f}"
    );

    // The close handshake: our close frame, the server's answer, then the connection ends.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .expect("send the close frame");
    match ws.read() {
        Ok(Message::Close(Some(frame))) => {
            assert_eq!(frame.code, CloseCode::Normal, "the server's close frame")
        }
        other => panic!("expected the server's close frame, got {other:?}"),
    }
    match ws.read() {
        Err(Error::ConnectionClosed) => {}
        other => panic!("expected the connection to end after the close handshake: {other:?}"),
    }
    drop(ws);

    // The socket's end frees its container, which stays (its window is a minute).
    wait_until(
        "the container idle once the socket closed",
        Duration::from_secs(10),
        || {
            let f = c.function_view("sockets", "echo");
            (f["busy"] == 0 && f["running"] == 0 && f["idle"] == 1).then_some(())
        },
    );
}
