//! A decoder seen through the dense K/V layout, so backends with different layouts make
//! their decisions at the same positions.

use std::ops::Range;

use specrej_core::{BackendError, Decoder, KvLayout, Sampling};

/// `D` reporting [`KvLayout::DENSE`] and `capacity` tokens: the scheduler then decides where a
/// dense backend of that capacity would. `D` must really hold at least that much (a layout
/// that shares the prompt holds more with the same bytes, so it never runs out first).
#[derive(Debug)]
pub struct DenseView<D> {
    pub inner: D,
    pub capacity: usize,
}

impl<D: Decoder> Decoder for DenseView<D> {
    type Batch = D::Batch;

    fn token_capacity(&self) -> usize {
        self.capacity
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }

    fn kv_layout(&self) -> KvLayout {
        KvLayout::DENSE
    }

    fn max_sequence_len(&self) -> usize {
        self.inner.max_sequence_len()
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<D::Batch, BackendError> {
        self.inner.prefill(prompt, rows, sampling)
    }

    fn step(
        &mut self,
        batch: &mut D::Batch,
    ) -> impl Future<Output = Result<Vec<u32>, BackendError>> {
        self.inner.step(batch)
    }

    fn retain(&mut self, batch: &mut D::Batch, keep: &[usize]) -> Result<(), BackendError> {
        self.inner.retain(batch, keep)
    }
}
