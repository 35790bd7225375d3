//! Byte-level BPE: words are mapped byte by byte onto printable characters
//! (GPT-2's table), then adjacent pieces merge by rank.

use std::collections::{BinaryHeap, HashMap};

use super::Tokenizer;

/// The printable character GPT-2's byte-level BPE uses for byte `b`.
pub(super) fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return b as char;
    }
    // Non-printable bytes map to U+0100 onwards, in byte order.
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('?')
}

fn char_to_byte(c: char) -> Option<u8> {
    let v = c as u32;
    if v < 256 {
        let b = v as u8;
        if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            return Some(b);
        }
        return None;
    }
    let rank = v - 256;
    (0u8..=255)
        .filter(|&x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
        .nth(rank as usize)
}

/// The bytes of a vocabulary piece written in GPT-2's byte alphabet.
pub(super) fn decode_piece(piece: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
struct Merge {
    rank: u32,
    left: usize,
    right: usize,
    merged_len: usize,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Lowest rank first; on ties, the leftmost pair (max-heap, so reversed).
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Tokenises one pre-tokenized word into `out`.
pub(super) fn encode_word(
    tok: &Tokenizer,
    ranks: &HashMap<(u32, u32), u32>,
    ignore_merges: bool,
    word: &str,
    out: &mut Vec<u32>,
) {
    let mapped: String = word.bytes().map(byte_to_char).collect();
    if ignore_merges {
        if let Some(&id) = tok.token_to_id.get(&mapped) {
            out.push(id);
            return;
        }
    }
    // Symbols as byte ranges of `mapped`, linked left to right.
    let mut start: Vec<usize> = mapped.char_indices().map(|(o, _)| o).collect();
    let n = start.len();
    start.push(mapped.len());
    let mut len: Vec<usize> = (0..n).map(|i| start[i + 1] - start[i]).collect();
    let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
    let mut next: Vec<Option<usize>> = (0..n).map(|i| (i + 1 < n).then_some(i + 1)).collect();
    let id_of = |s: usize, l: usize| tok.token_to_id.get(&mapped[s..s + l]).copied();
    let mut queue = BinaryHeap::new();
    let add = |queue: &mut BinaryHeap<Merge>, len: &[usize], l: Option<usize>, r: Option<usize>| {
        let (Some(l), Some(r)) = (l, r) else { return };
        let (Some(a), Some(b)) = (id_of(start[l], len[l]), id_of(start[r], len[r])) else {
            return;
        };
        if let Some(&rank) = ranks.get(&(a, b)) {
            queue.push(Merge {
                rank,
                left: l,
                right: r,
                merged_len: len[l] + len[r],
            });
        }
    };
    for i in 1..n {
        add(&mut queue, &len, Some(i - 1), Some(i));
    }
    while let Some(m) = queue.pop() {
        if len[m.left] == 0
            || len[m.right] == 0
            || len[m.left] + len[m.right] != m.merged_len
            || next[m.left] != Some(m.right)
        {
            continue;
        }
        len[m.left] += len[m.right];
        len[m.right] = 0;
        next[m.left] = next[m.right];
        if let Some(nx) = next[m.right] {
            prev[nx] = Some(m.left);
        }
        add(&mut queue, &len, prev[m.left], Some(m.left));
        add(&mut queue, &len, Some(m.left), next[m.left]);
    }
    let mut i = if n > 0 { Some(0) } else { None };
    while let Some(idx) = i {
        let piece = &mapped[start[idx]..start[idx] + len[idx]];
        match tok.token_to_id.get(piece) {
            Some(&id) => out.push(id),
            None => {
                for c in piece.chars() {
                    let mut buf = [0u8; 4];
                    if let Some(&id) = tok.token_to_id.get(&*c.encode_utf8(&mut buf)) {
                        out.push(id);
                    }
                }
            }
        }
        i = next[idx];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_round_trips() {
        for b in 0u8..=255 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(byte_to_char(b' '), '\u{120}');
        assert_eq!(byte_to_char(b'\n'), '\u{10A}');
    }
}
