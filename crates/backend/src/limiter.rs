//! At most N VMs at once, a bounded queue in front, and a stop switch for shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("no VM became free within {0} ms")]
    QueueTimeout(u128),
    #[error("the server is shutting down")]
    ShuttingDown,
}

pub struct Limiter {
    sem: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
    queue_timeout: Duration,
    closed: AtomicBool,
}

/// Holding one lets a request run a VM.
pub struct Permit {
    _permit: OwnedSemaphorePermit,
}

struct Waiting<'a>(&'a AtomicUsize);
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Limiter {
    pub fn new(max_running: usize, max_queue: usize, queue_timeout: Duration) -> Self {
        Limiter {
            sem: Arc::new(Semaphore::new(max_running)),
            waiting: AtomicUsize::new(0),
            max_queue,
            queue_timeout,
            closed: AtomicBool::new(false),
        }
    }

    pub async fn acquire(&self) -> Result<Permit, LimitError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(LimitError::ShuttingDown);
        }
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Ok(Permit { _permit: p });
        }
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _w = Waiting(&self.waiting);
        if before >= self.max_queue {
            return Err(LimitError::QueueFull(before));
        }
        match tokio::time::timeout(self.queue_timeout, self.sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Permit { _permit: p }),
            Ok(Err(_)) => Err(LimitError::ShuttingDown),
            Err(_) => Err(LimitError::QueueTimeout(self.queue_timeout.as_millis())),
        }
    }

    /// A VM slot if one is free now, else `None`: never waits and never takes a place in the
    /// queue (background work, such as stored Judge0 submissions, must not crowd clients out
    /// of it).
    pub fn try_acquire(&self) -> Result<Option<Permit>, LimitError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(LimitError::ShuttingDown);
        }
        match self.sem.clone().try_acquire_owned() {
            Ok(p) => Ok(Some(Permit { _permit: p })),
            Err(tokio::sync::TryAcquireError::NoPermits) => Ok(None),
            Err(tokio::sync::TryAcquireError::Closed) => Err(LimitError::ShuttingDown),
        }
    }

    /// Requests waiting for a VM.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Refuses new work and wakes every waiter with [`LimitError::ShuttingDown`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.sem.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_bounds_and_close() {
        let l = Arc::new(Limiter::new(1, 1, Duration::from_millis(200)));
        let p = l.acquire().await.expect("first runs");
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(l.queued(), 1);
        assert!(matches!(l.acquire().await, Err(LimitError::QueueFull(1))));
        assert_eq!(
            waiter.await.expect("join"),
            Err(LimitError::QueueTimeout(200))
        );
        drop(p);
        let p = l.acquire().await.expect("free again");
        drop(p);
        l.close();
        assert!(matches!(l.acquire().await, Err(LimitError::ShuttingDown)));
    }

    #[tokio::test]
    async fn try_acquire_never_queues() {
        let l = Limiter::new(1, 1, Duration::from_millis(200));
        let p = l.try_acquire().expect("open").expect("a free slot");
        assert!(l.try_acquire().expect("open").is_none());
        assert_eq!(l.queued(), 0, "a refused try takes no queue place");
        drop(p);
        assert!(l.try_acquire().expect("open").is_some());
        l.close();
        assert!(matches!(l.try_acquire(), Err(LimitError::ShuttingDown)));
    }
}
