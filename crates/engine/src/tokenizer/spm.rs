//! SentencePiece-style tokenisation: greedy merging of adjacent pieces by
//! vocabulary score, with byte fallback for pieces not in the vocabulary.

use std::collections::{BinaryHeap, HashMap};

use super::Tokenizer;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Highest score first; on ties, the leftmost pair.
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Tokenises `text` (spaces already escaped as U+2581) into `out`.
pub(super) fn encode<'a>(tok: &Tokenizer, text: &'a str, out: &mut Vec<u32>) {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, ch)) in text.char_indices().enumerate() {
        symbols.push(Symbol {
            start,
            len: ch.len_utf8(),
            prev: i.checked_sub(1),
            next: None,
        });
    }
    let n = symbols.len();
    for (i, s) in symbols.iter_mut().enumerate() {
        s.next = (i + 1 < n).then_some(i + 1);
    }
    let mut queue = BinaryHeap::new();
    let mut merged_from: HashMap<&'a str, (usize, usize)> = HashMap::new();
    let try_add = |symbols: &[Symbol],
                   queue: &mut BinaryHeap<Bigram>,
                   merged_from: &mut HashMap<&'a str, (usize, usize)>,
                   left: Option<usize>,
                   right: Option<usize>| {
        let (Some(l), Some(r)) = (left, right) else {
            return;
        };
        let piece: &'a str = &text[symbols[l].start..symbols[r].start + symbols[r].len];
        if let Some(&id) = tok.token_to_id.get(piece) {
            queue.push(Bigram {
                score: tok.scores[id as usize],
                left: l,
                right: r,
                len: piece.len(),
            });
            merged_from.insert(piece, (l, r));
        }
    };
    for i in 1..n {
        try_add(&symbols, &mut queue, &mut merged_from, Some(i - 1), Some(i));
    }
    while let Some(b) = queue.pop() {
        let (l, r) = (symbols[b.left], symbols[b.right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
            continue;
        }
        symbols[b.left].len += r.len;
        symbols[b.right].len = 0;
        symbols[b.left].next = r.next;
        if let Some(nx) = r.next {
            symbols[nx].prev = Some(b.left);
        }
        let prev = symbols[b.left].prev;
        let next = symbols[b.left].next;
        try_add(&symbols, &mut queue, &mut merged_from, prev, Some(b.left));
        try_add(&symbols, &mut queue, &mut merged_from, Some(b.left), next);
    }
    let mut i = if n > 0 { Some(0) } else { None };
    while let Some(idx) = i {
        let s = symbols[idx];
        resegment(tok, text, &symbols, &merged_from, s.start, s.len, out);
        i = s.next;
    }
}

fn resegment(
    tok: &Tokenizer,
    text: &str,
    symbols: &[Symbol],
    merged_from: &HashMap<&str, (usize, usize)>,
    start: usize,
    len: usize,
    out: &mut Vec<u32>,
) {
    let piece = &text[start..start + len];
    if let Some(&id) = tok.token_to_id.get(piece) {
        out.push(id);
        return;
    }
    match merged_from.get(piece) {
        Some(&(l, r)) => {
            let (ls, rs) = (symbols[l], symbols[r]);
            resegment(
                tok,
                text,
                symbols,
                merged_from,
                ls.start,
                rs.start - ls.start,
                out,
            );
            resegment(
                tok,
                text,
                symbols,
                merged_from,
                rs.start,
                start + len - rs.start,
                out,
            );
        }
        None => {
            for &b in piece.as_bytes() {
                out.push(tok.byte_tokens[b as usize].unwrap_or_else(|| tok.unknown_or_zero()));
            }
        }
    }
}
