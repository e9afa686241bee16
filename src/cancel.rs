//! Running a connection's future until flowgate stops it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Polls `future` to its end (`Some`), or until `token` is cancelled (`None`):
/// a `select!` of the two, cheaper on each of the connection's many polls. The
/// token's waiter is polled (which takes the token's lock) only to register a
/// waker it does not hold yet; otherwise the token's flag is read.
pub fn until_cancelled<'a, F>(
    future: Pin<&'a mut F>,
    token: &'a CancellationToken,
) -> UntilCancelled<'a, F>
where
    F: Future + ?Sized,
{
    UntilCancelled {
        future,
        token,
        cancelled: token.cancelled(),
        registered: None,
    }
}

pin_project! {
    /// The future of [`until_cancelled`]: a plain struct, not an async fn, so
    /// that a connection's task holds nothing more than these four fields.
    pub struct UntilCancelled<'a, F: ?Sized> {
        future: Pin<&'a mut F>,
        token: &'a CancellationToken,
        #[pin]
        cancelled: WaitForCancellationFuture<'a>,
        registered: Option<Waker>,
    }
}

impl<F: Future + ?Sized> Future for UntilCancelled<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        if this.token.is_cancelled() {
            return Poll::Ready(None);
        }
        if !this
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            if this.cancelled.poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            *this.registered = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_future_ends_first() {
        let token = CancellationToken::new();
        let future = std::pin::pin!(async { 7 });
        assert_eq!(until_cancelled(future, &token).await, Some(7));
    }

    #[tokio::test]
    async fn cancelling_ends_a_waiting_future() {
        let token = CancellationToken::new();
        let waiting = tokio::spawn({
            let token = token.clone();
            async move {
                let never = std::pin::pin!(std::future::pending::<()>());
                until_cancelled(never, &token).await
            }
        });
        // Cancelled only after the task has registered and is waiting.
        tokio::task::yield_now().await;
        token.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(ended.expect("woken by the cancellation").unwrap(), None);
    }

    #[tokio::test]
    async fn a_cancelled_token_ends_it_at_once() {
        let token = CancellationToken::new();
        token.cancel();
        let never = std::pin::pin!(std::future::pending::<()>());
        assert_eq!(until_cancelled(never, &token).await, None);
    }

    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polled with another waker (moved to another task, or under a
    /// combinator with wakers of its own), it registers that one.
    #[test]
    fn the_latest_waker_is_woken() {
        let token = CancellationToken::new();
        let mut never = Box::pin(std::future::pending::<()>());
        let mut waiting = Box::pin(until_cancelled(never.as_mut(), &token));
        let first = Arc::new(Counting(AtomicUsize::new(0)));
        let second = Arc::new(Counting(AtomicUsize::new(0)));
        for waker in [&first, &second] {
            let waker = Waker::from(Arc::clone(waker));
            let poll = waiting.as_mut().poll(&mut Context::from_waker(&waker));
            assert!(poll.is_pending());
        }
        token.cancel();
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the latest waker is woken"
        );
        let waker = Waker::from(Arc::clone(&second));
        let poll = waiting.as_mut().poll(&mut Context::from_waker(&waker));
        assert_eq!(poll, Poll::Ready(None));
    }
}
