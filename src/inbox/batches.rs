//! Deliveries grouped into batches bounded by count and by bytes.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;

/// The items `inner` has ready, in batches of at most `max_items` and, unless a single item
/// is larger, `max_bytes` (by `size`): an item that would take a batch past its bytes starts
/// the next one. Like `ready_chunks`, a batch is what is ready now: it never waits to fill.
pub(super) struct Batches<S: Stream> {
    inner: S,
    /// The item that did not fit in the last batch: the next one starts with it.
    carried: Option<S::Item>,
    /// `inner` has ended.
    done: bool,
    max_items: usize,
    max_bytes: usize,
    size: fn(&S::Item) -> usize,
}

impl<S: Stream> Batches<S> {
    pub(super) fn new(
        inner: S,
        max_items: usize,
        max_bytes: usize,
        size: fn(&S::Item) -> usize,
    ) -> Self {
        Batches {
            inner,
            carried: None,
            done: false,
            max_items: max_items.max(1),
            max_bytes,
            size,
        }
    }
}

// Nothing is pinned but `inner`, which is `Unpin` itself.
impl<S: Stream + Unpin> Unpin for Batches<S> {}

impl<S: Stream + Unpin> Stream for Batches<S> {
    type Item = Vec<S::Item>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut batch = Vec::new();
        let mut bytes = 0;
        if let Some(item) = this.carried.take() {
            bytes += (this.size)(&item);
            batch.push(item);
        }
        while !this.done && batch.len() < this.max_items && bytes < this.max_bytes {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    let size = (this.size)(&item);
                    if !batch.is_empty() && bytes + size > this.max_bytes {
                        this.carried = Some(item);
                        break;
                    }
                    bytes += size;
                    batch.push(item);
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending => break,
            }
        }
        match (batch.is_empty(), this.done) {
            (false, _) => Poll::Ready(Some(batch)),
            (true, true) => Poll::Ready(None),
            (true, false) => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt};
    use proptest::prelude::*;

    fn batches_of(sizes: &[usize], max_items: usize, max_bytes: usize) -> Vec<Vec<usize>> {
        let stream = futures_util::stream::iter(sizes.to_vec());
        let batches = Batches::new(stream, max_items, max_bytes, |&n| n);
        // Every item is ready at once: the stream never waits.
        batches.collect().now_or_never().expect("never pending")
    }

    #[test]
    fn a_batch_stops_before_the_item_that_would_take_it_past_its_bytes() {
        assert_eq!(
            batches_of(&[4, 4, 4, 10, 1, 1], 10, 8),
            vec![vec![4, 4], vec![4], vec![10], vec![1, 1]]
        );
        assert_eq!(batches_of(&[1, 1, 1], 2, 100), vec![vec![1, 1], vec![1]]);
    }

    proptest! {
        /// Every item comes out once, in order; each batch holds at most `max_items` and,
        /// unless it is a single item, at most `max_bytes`.
        #[test]
        fn batches_keep_every_item_in_order_within_their_bounds(
            sizes in proptest::collection::vec(0usize..100, 0..60),
            max_items in 1usize..10,
            max_bytes in 1usize..200,
        ) {
            let batches = batches_of(&sizes, max_items, max_bytes);
            prop_assert_eq!(batches.concat(), sizes);
            for batch in &batches {
                prop_assert!(!batch.is_empty() && batch.len() <= max_items);
                prop_assert!(batch.len() == 1 || batch.iter().sum::<usize>() <= max_bytes);
            }
        }
    }
}
