//! One output stream of a command, kept within a cap: its first half and its last half, with
//! the count of what fell between, so a result is never silently cut (the head shows what
//! started, the tail how it ended).

use std::collections::VecDeque;

/// Output of one stream, at most `cap` bytes of it kept.
#[derive(Debug, Clone)]
pub struct Capture {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_cap: usize,
    tail_cap: usize,
    total: u64,
}

impl Capture {
    /// Keeps at most `cap` bytes: the first `cap - cap / 2` and the last `cap / 2`.
    pub fn new(cap: usize) -> Capture {
        let tail_cap = cap / 2;
        Capture {
            head: Vec::new(),
            tail: VecDeque::new(),
            head_cap: cap - tail_cap,
            tail_cap,
            total: 0,
        }
    }

    /// Keeps only the last `cap` bytes (a terminal's replay buffer).
    pub fn ring(cap: usize) -> Capture {
        Capture {
            head: Vec::new(),
            tail: VecDeque::new(),
            head_cap: 0,
            tail_cap: cap,
            total: 0,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = self.head_cap - self.head.len();
        let take = room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..take]);
        bytes = &bytes[take..];
        if bytes.is_empty() || self.tail_cap == 0 {
            return;
        }
        if bytes.len() >= self.tail_cap {
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - self.tail_cap..]);
        } else {
            let over = (self.tail.len() + bytes.len()).saturating_sub(self.tail_cap);
            self.tail.drain(..over);
            self.tail.extend(bytes);
        }
    }

    /// What is still kept from `offset` on, as `(offset, bytes)` pieces in order: a piece
    /// that starts after the end of the one before (or after `offset`) means the bytes
    /// between were dropped.
    pub fn since(&self, offset: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let head = self.head.len() as u64;
        if offset < head {
            out.push((offset, self.head[offset as usize..].to_vec()));
        }
        let tail_start = self.total - self.tail.len() as u64;
        let from = offset.max(tail_start).max(head);
        if from < self.total {
            let skip = (from - tail_start) as usize;
            out.push((from, self.tail.iter().skip(skip).copied().collect()));
        }
        out
    }

    /// Bytes the command wrote to this stream.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether some output was dropped.
    pub fn truncated(&self) -> bool {
        self.total > (self.head.len() + self.tail.len()) as u64
    }

    /// The kept output; when some was dropped, the marker
    /// `\n[sandgate: N bytes omitted]\n` stands between head and tail. The cut never splits a
    /// UTF-8 character of text output (a partial one at either edge counts as omitted).
    pub fn render(&self) -> Vec<u8> {
        let (tail_a, tail_b) = self.tail.as_slices();
        if !self.truncated() {
            let mut out = Vec::with_capacity(self.head.len() + self.tail.len());
            out.extend_from_slice(&self.head);
            out.extend_from_slice(tail_a);
            out.extend_from_slice(tail_b);
            return out;
        }
        let head = match std::str::from_utf8(&self.head) {
            Err(e) if e.error_len().is_none() => &self.head[..e.valid_up_to()],
            _ => &self.head[..],
        };
        let skip = self
            .tail
            .iter()
            .take(3)
            .take_while(|b| (**b & 0xC0) == 0x80)
            .count();
        let kept = (head.len() + self.tail.len() - skip) as u64;
        let marker = format!("\n[sandgate: {} bytes omitted]\n", self.total - kept);
        let mut out = Vec::with_capacity(head.len() + marker.len() + self.tail.len());
        out.extend_from_slice(head);
        out.extend_from_slice(marker.as_bytes());
        out.extend(self.tail.iter().skip(skip));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_under_the_cap() {
        let mut c = Capture::new(10);
        c.push(b"hello");
        c.push(b" you");
        assert!(!c.truncated());
        assert_eq!(c.render(), b"hello you");
        c.push(b"!");
        assert_eq!(c.render(), b"hello you!");
        assert_eq!(c.total(), 10);
    }

    #[test]
    fn keeps_head_and_tail_over_the_cap() {
        let mut c = Capture::new(6);
        for b in b"abcdefghijkl".chunks(5) {
            c.push(b);
        }
        assert!(c.truncated());
        assert_eq!(c.total(), 12);
        assert_eq!(c.render(), b"abc\n[sandgate: 6 bytes omitted]\njkl");
        // One huge write.
        let mut c = Capture::new(4);
        c.push(&[7u8; 1000]);
        assert_eq!(
            c.render().len(),
            4 + "\n[sandgate: 996 bytes omitted]\n".len()
        );
    }

    #[test]
    fn replays_what_it_kept_from_an_offset() {
        let mut c = Capture::new(6);
        c.push(b"abc");
        assert_eq!(c.since(0), vec![(0, b"abc".to_vec())]);
        assert_eq!(c.since(2), vec![(2, b"c".to_vec())]);
        assert!(c.since(3).is_empty());
        c.push(b"defghijkl");
        // Head "abc", tail "jkl": "defghi" is gone.
        assert_eq!(c.since(1), vec![(1, b"bc".to_vec()), (9, b"jkl".to_vec())]);
        assert_eq!(c.since(4), vec![(9, b"jkl".to_vec())]);
        assert_eq!(c.since(10), vec![(10, b"kl".to_vec())]);
        assert!(c.since(12).is_empty());
    }

    #[test]
    fn never_splits_a_character() {
        let text = "ééééééé"; // 14 bytes
                              // Head: 3 bytes (one and a half characters), tail: 3 bytes (a half and one).
        let mut c = Capture::new(6);
        c.push(text.as_bytes());
        let out = String::from_utf8(c.render()).expect("valid UTF-8");
        assert_eq!(out, "é\n[sandgate: 10 bytes omitted]\né");
    }
}
