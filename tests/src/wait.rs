//! Waiting for conditions by polling, never by fixed sleeps.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what` and the last
/// reason `check` gave (its `Err`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(reason) if start.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting for {what}: {reason}")
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(250));
            }
        }
    }
}
