//! Pre-tokenizers of byte-level BPE vocabularies: the regular expressions that
//! split text into words before merging, written out as matchers.
//!
//! Each matcher returns the length (in chars) of the regex match starting at a
//! position, trying the alternatives in order as a backtracking regex engine
//! would. Text between matches stays a fragment of its own, and several
//! expressions apply in turn, as llama.cpp does.

use unicode_general_category::{get_general_category, GeneralCategory as G};

/// Length in chars of a match starting at a position, if any.
type Matcher = fn(&[char], usize) -> Option<usize>;

/// Which pre-tokenizer a vocabulary uses (`tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// Qwen 2: contractions, letters with one leading non-letter, single digits.
    Qwen2,
    /// Llama 3 (`llama-bpe`): as Qwen 2 with digit runs of up to three.
    Llama3,
    /// GPT-2 (`default`): punctuation runs, then the GPT-2 expression, then digit triples.
    Gpt2,
}

impl PreTokenizer {
    /// Maps a `tokenizer.ggml.pre` name to a pre-tokenizer.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "qwen2" | "deepseek-r1-qwen" => PreTokenizer::Qwen2,
            "llama-bpe" | "llama3" | "smaug-bpe" => PreTokenizer::Llama3,
            "default" | "gpt2" | "gpt-2" => PreTokenizer::Gpt2,
            _ => return None,
        })
    }

    /// Splits `text` into words.
    pub fn split<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces = vec![text];
        let matchers: &[Matcher] = match self {
            PreTokenizer::Qwen2 => &[qwen2],
            PreTokenizer::Llama3 => &[llama3],
            PreTokenizer::Gpt2 => &[punctuation_run, gpt2, digit_run, digit_triple],
        };
        for m in matchers {
            pieces = pieces.into_iter().flat_map(|p| split_by(p, *m)).collect();
        }
        pieces
    }
}

fn split_by(text: &str, matcher: Matcher) -> Vec<&str> {
    let chars: Vec<char> = text.chars().collect();
    let mut offsets: Vec<usize> = text.char_indices().map(|(o, _)| o).collect();
    offsets.push(text.len());
    let mut out = Vec::new();
    let mut pending = 0;
    let mut i = 0;
    while i < chars.len() {
        match matcher(&chars, i) {
            Some(n) if n > 0 => {
                if pending < i {
                    out.push(&text[offsets[pending]..offsets[i]]);
                }
                out.push(&text[offsets[i]..offsets[i + n]]);
                i += n;
                pending = i;
            }
            _ => i += 1,
        }
    }
    if pending < chars.len() {
        out.push(&text[offsets[pending]..]);
    }
    out
}

fn is_letter(c: char) -> bool {
    matches!(
        get_general_category(c),
        G::UppercaseLetter
            | G::LowercaseLetter
            | G::TitlecaseLetter
            | G::ModifierLetter
            | G::OtherLetter
    )
}

fn is_number(c: char) -> bool {
    matches!(
        get_general_category(c),
        G::DecimalNumber | G::LetterNumber | G::OtherNumber
    )
}

fn is_punctuation(c: char) -> bool {
    matches!(
        get_general_category(c),
        G::ConnectorPunctuation
            | G::DashPunctuation
            | G::OpenPunctuation
            | G::ClosePunctuation
            | G::InitialPunctuation
            | G::FinalPunctuation
            | G::OtherPunctuation
    )
}

fn is_space(c: char) -> bool {
    c.is_whitespace()
}

fn is_other(c: char) -> bool {
    !is_space(c) && !is_letter(c) && !is_number(c)
}

fn is_newline(c: char) -> bool {
    c == '\r' || c == '\n'
}

fn run(chars: &[char], mut i: usize, pred: impl Fn(char) -> bool) -> usize {
    while i < chars.len() && pred(chars[i]) {
        i += 1;
    }
    i
}

/// `'s|'t|'re|'ve|'m|'ll|'d`, optionally case-insensitive.
fn contraction(chars: &[char], i: usize, any_case: bool) -> Option<usize> {
    if chars.get(i) != Some(&'\'') {
        return None;
    }
    let at = |k: usize| {
        chars
            .get(i + k)
            .map(|&c| if any_case { c.to_ascii_lowercase() } else { c })
    };
    match (at(1), at(2)) {
        (Some('s' | 't' | 'm' | 'd'), _) => Some(2),
        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => Some(3),
        _ => None,
    }
}

/// The whitespace alternatives shared by the Qwen 2 and Llama 3 expressions:
/// `\s*[\r\n]+|\s+(?!\S)|\s+`.
fn whitespace_tail(chars: &[char], i: usize, with_newline_rule: bool) -> Option<usize> {
    if !is_space(chars[i]) {
        return None;
    }
    let end = run(chars, i, is_space);
    if with_newline_rule {
        if let Some(last_nl) = (i..end).rev().find(|&k| is_newline(chars[k])) {
            return Some(last_nl + 1 - i);
        }
    }
    if end == chars.len() {
        return Some(end - i);
    }
    if end - i >= 2 {
        return Some(end - 1 - i);
    }
    Some(end - i)
}

fn qwen_like(chars: &[char], i: usize, max_digits: usize) -> Option<usize> {
    if let Some(n) = contraction(chars, i, true) {
        return Some(n);
    }
    let c = chars[i];
    if is_letter(c) {
        return Some(run(chars, i, is_letter) - i);
    }
    if !is_newline(c) && !is_number(c) && chars.get(i + 1).is_some_and(|&n| is_letter(n)) {
        return Some(run(chars, i + 1, is_letter) - i);
    }
    if is_number(c) {
        return Some((run(chars, i, is_number) - i).min(max_digits));
    }
    let start = if c == ' ' && chars.get(i + 1).is_some_and(|&n| is_other(n)) {
        i + 1
    } else {
        i
    };
    if is_other(chars[start]) {
        let end = run(chars, start, is_other);
        return Some(run(chars, end, is_newline) - i);
    }
    whitespace_tail(chars, i, true)
}

fn qwen2(chars: &[char], i: usize) -> Option<usize> {
    qwen_like(chars, i, 1)
}

fn llama3(chars: &[char], i: usize) -> Option<usize> {
    qwen_like(chars, i, 3)
}

/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`
fn gpt2(chars: &[char], i: usize) -> Option<usize> {
    if let Some(n) = contraction(chars, i, false) {
        return Some(n);
    }
    let start = if chars[i] == ' ' && i + 1 < chars.len() && !is_space(chars[i + 1]) {
        i + 1
    } else {
        i
    };
    let c = chars[start];
    for class in [is_letter as fn(char) -> bool, is_number, is_other] {
        if class(c) {
            return Some(run(chars, start, class) - i);
        }
    }
    if !is_space(chars[i]) {
        return None;
    }
    let end = run(chars, i, is_space);
    if end == chars.len() {
        Some(end - i)
    } else if end - i >= 2 {
        Some(end - 1 - i)
    } else {
        None
    }
}

/// `[\p{P}\$\+<=>\^~\|]+`
fn punctuation_run(chars: &[char], i: usize) -> Option<usize> {
    let p =
        |c: char| is_punctuation(c) || matches!(c, '$' | '+' | '<' | '=' | '>' | '^' | '~' | '|');
    let end = run(chars, i, p);
    (end > i).then_some(end - i)
}

/// `\p{N}+`
fn digit_run(chars: &[char], i: usize) -> Option<usize> {
    let end = run(chars, i, is_number);
    (end > i).then_some(end - i)
}

/// `[0-9][0-9][0-9]`
fn digit_triple(chars: &[char], i: usize) -> Option<usize> {
    (i + 3 <= chars.len() && chars[i..i + 3].iter().all(|c| c.is_ascii_digit())).then_some(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pre: PreTokenizer, text: &str, want: &[&str]) {
        assert_eq!(pre.split(text), want, "{pre:?} on {text:?}");
    }

    #[test]
    fn qwen2_splits_like_its_regex() {
        let q = PreTokenizer::Qwen2;
        check(q, "Hello world", &["Hello", " world"]);
        check(q, "I'm 123", &["I", "'m", " ", "1", "2", "3"]);
        check(q, "a  b", &["a", " ", " b"]);
        check(q, "x \n\n y", &["x", " \n\n", " y"]);
        check(q, "ends  ", &["ends", "  "]);
        check(q, "(foo)!!\n", &["(foo", ")!!\n"]);
        check(q, "\t\tindented", &["\t", "\tindented"]);
    }

    #[test]
    fn llama3_groups_three_digits() {
        check(PreTokenizer::Llama3, "12345", &["123", "45"]);
    }

    #[test]
    fn gpt2_default_splits_punctuation_first() {
        check(
            PreTokenizer::Gpt2,
            "Hello, world 12345",
            &["Hello", ",", " world", " ", "123", "45"],
        );
    }
}
