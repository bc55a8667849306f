//! Drives futures whose backend never suspends (CPU, CUDA, component imports).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Polls `future` once with a no-op waker and returns its output.
///
/// # Panics
/// If the future is not ready on the first poll: that means a backend that really
/// suspends (WebGPU) was driven from synchronous code, which would deadlock a browser tab.
/// Such backends must be awaited by an executor instead.
pub fn block_on_ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!(
            "block_on_ready: the future suspended; a suspending backend must be awaited by an executor"
        ),
    }
}
