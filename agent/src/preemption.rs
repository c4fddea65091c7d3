//! The spot-interruption watcher: polls the cloud's metadata URL and, once it announces an
//! interruption, tells the coordinator (which marks the node preempting and moves its
//! work elsewhere before the deadline).
//!
//! The notice format is AWS's (`GET …/latest/meta-data/spot/instance-action`): 404 while
//! there is none; 200 with `{"action": "terminate", "time": "2026-11-29T21:30:00Z"}` once
//! there is. Any other 200 answer counts as a notice too, with AWS's two minutes of warning
//! when it carries no parseable `time`. Errors and other statuses are logged and polled
//! again.

use gantry_shared::now_ms;
use std::time::Duration;

/// What a notice gives when it names no time: AWS's warning period.
pub const DEFAULT_WARNING: Duration = Duration::from_secs(120);

/// The deadline (unix ms) a notice body announces, given the time it was read.
pub fn deadline_from(body: &str, now_ms: u64) -> u64 {
    let fallback = now_ms + DEFAULT_WARNING.as_millis() as u64;
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return fallback;
    };
    v.get("time")
        .and_then(|t| t.as_str())
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
        .unwrap_or(fallback)
}

/// Polls `url` every `interval` until a notice appears; returns its deadline (unix ms).
/// Runs until cancelled.
pub async fn wait_for_notice(
    url: &str,
    interval: Duration,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<u64> {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the spot-notice HTTP client");
            return None;
        }
    };
    let mut warned = false;
    loop {
        match http.get(url).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => warned = false,
            Ok(r) if r.status().is_success() => {
                let body = r.text().await.unwrap_or_default();
                let deadline = deadline_from(&body, now_ms());
                tracing::warn!(%url, deadline_ms = deadline, "spot interruption notice");
                return Some(deadline);
            }
            Ok(r) => {
                if !warned {
                    tracing::warn!(%url, status = %r.status(), "unexpected answer from the spot-notice URL");
                    warned = true;
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(%url, error = %e, "cannot reach the spot-notice URL");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_give_their_time_or_two_minutes() {
        let t = deadline_from(
            r#"{"action": "terminate", "time": "2026-11-29T21:30:00Z"}"#,
            0,
        );
        assert_eq!(t, 1_795_987_800_000);
        assert_eq!(deadline_from("TRUE", 1_000), 121_000);
        assert_eq!(deadline_from(r#"{"action": "stop"}"#, 1_000), 121_000);
    }

    #[tokio::test]
    async fn polls_until_the_notice_appears() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for answer in [
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned(),
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned(),
                {
                    let body = r#"{"action":"terminate","time":"2026-11-29T21:30:00Z"}"#;
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                },
            ] {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let url = format!("http://{addr}/latest/meta-data/spot/instance-action");
        let cancel = tokio_util::sync::CancellationToken::new();
        let deadline = tokio::time::timeout(
            Duration::from_secs(10),
            wait_for_notice(&url, Duration::from_millis(20), &cancel),
        )
        .await
        .expect("in time");
        assert_eq!(deadline, Some(1_795_987_800_000));
    }
}
