//! Spare read buffers, so that a session holds a buffer only while its
//! client has bytes in flight (an idle client holds none) without paying
//! an 8 KiB allocation on every transaction. Each worker thread keeps a
//! few buffers given back; a session takes one when its client's next
//! bytes arrive and gives it back when they are all handled.

use std::cell::RefCell;

use bytes::BytesMut;

/// The room a taken buffer has.
pub const SIZE: usize = 8 * 1024;
/// Buffers kept per thread.
const KEEP: usize = 64;
/// Larger buffers (a client that sent a big batch) are freed, not kept.
const KEEP_UP_TO: usize = 64 * 1024;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with at least [`SIZE`] bytes of room.
pub fn take() -> BytesMut {
    let mut b = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    b.reserve(SIZE);
    b
}

/// Give an emptied buffer back (its bytes are dropped).
pub fn give(mut b: BytesMut) {
    b.clear();
    // Its room counts from where its bytes were consumed up to: reclaim
    // it all, in place (not possible if the buffer is shared).
    if !b.try_reclaim(SIZE) || b.capacity() > KEEP_UP_TO {
        return;
    }
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(b);
        }
    });
}

#[cfg(test)]
mod tests {
    use bytes::Buf;

    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_empty() {
        let mut b = take();
        assert!(b.capacity() >= SIZE && b.is_empty());
        let at = b.as_ptr();
        b.extend_from_slice(b"hello");
        b.advance(3);
        give(b);
        let b = take();
        assert!(b.is_empty() && b.capacity() >= SIZE);
        assert_eq!(b.as_ptr(), at, "the same buffer, reused in place");
    }

    #[test]
    fn small_and_large_buffers_are_not_kept() {
        give(BytesMut::with_capacity(16));
        give(BytesMut::with_capacity(KEEP_UP_TO * 2));
        let kept =
            SPARE.with(|s| s.borrow().iter().filter(|b| b.capacity() < SIZE || b.capacity() > KEEP_UP_TO).count());
        assert_eq!(kept, 0);
    }
}
