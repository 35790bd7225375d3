//! Request preparation off the async workers. Parsing, templating and
//! tokenising a large body takes milliseconds of CPU; on a tokio worker it
//! would hold up every connection that worker serves, `/health` included.
//! Bodies past [`INLINE_LIMIT`] are prepared on the blocking pool instead,
//! a bounded number at once, so that a flood of heavy bodies waits its
//! turn rather than takes every core.

use std::sync::LazyLock;

use tokio::sync::Semaphore;

use crate::error::ServerError;

/// Bodies up to this many bytes are prepared where they arrive: their
/// work is shorter than a hand-off to another thread.
pub(crate) const INLINE_LIMIT: usize = 16 << 10;

/// Preparations running at once: one per core.
static PREPARATIONS: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())));

/// Runs `work` on the blocking pool when `size` (the body's length) is
/// past [`INLINE_LIMIT`], here otherwise. A panic in it is a 500.
pub(crate) async fn prepare<T, F>(size: usize, work: F) -> Result<T, ServerError>
where
    F: FnOnce() -> Result<T, ServerError> + Send + 'static,
    T: Send + 'static,
{
    if size <= INLINE_LIMIT {
        return work();
    }
    off_workers(work).await
}

/// Runs `work` on the blocking pool, at most one per core at once. A panic
/// in it is a 500.
pub(crate) async fn off_workers<T, F>(work: F) -> Result<T, ServerError>
where
    F: FnOnce() -> Result<T, ServerError> + Send + 'static,
    T: Send + 'static,
{
    let _turn = PREPARATIONS
        .acquire()
        .await
        .map_err(|_| ServerError::Internal("the preparation pool is closed".into()))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| ServerError::Internal("preparing the request failed".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn large_bodies_leave_the_async_worker_and_small_ones_stay() {
        let here = std::thread::current().id();
        let small = prepare(10, move || Ok(std::thread::current().id()))
            .await
            .unwrap();
        assert_eq!(small, here);
        let large = prepare(INLINE_LIMIT + 1, move || Ok(std::thread::current().id()))
            .await
            .unwrap();
        assert_ne!(large, here);
        let failed = prepare::<(), _>(INLINE_LIMIT + 1, || panic!("boom")).await;
        assert!(matches!(failed, Err(ServerError::Internal(_))));
    }
}
