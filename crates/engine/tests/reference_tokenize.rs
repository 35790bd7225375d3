//! Tokenisation equals llama.cpp's on every line of
//! `crates/testkit/reference/*/tokenize.jsonl`, for both models.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use neocloud_engine::gguf::GgufFile;
use neocloud_engine::tokenizer::{StreamDecoder, Tokenizer};

fn check_model(name: &str) {
    let gguf = GgufFile::open(&common::model_path(name)).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let mut failures = Vec::new();
    let lines = neocloud_testkit::reference_lines(name, "tokenize.jsonl");
    for line in &lines {
        let text = line["text"].as_str().unwrap();
        let add_special = line["add_special"].as_bool().unwrap();
        let parse_special = line["parse_special"].as_bool().unwrap();
        let want: Vec<u32> = line["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, add_special, parse_special);
        if got != want {
            failures.push(format!(
                "{text:?} add_special={add_special} parse_special={parse_special}: got {got:?}, want {want:?}"
            ));
        }
        // Streaming detokenisation rebuilds the text of plain inputs.
        if !parse_special {
            let mut dec = StreamDecoder::new();
            let mut out: String = got.iter().map(|&id| dec.push(&tok, id)).collect();
            out.push_str(&dec.finish());
            let out = out
                .strip_prefix(' ')
                .filter(|_| tok.adds_space_prefix())
                .unwrap_or(&out);
            if out != text {
                failures.push(format!("detokenised {text:?} as {out:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} lines differ:\n{}",
        failures.len(),
        lines.len(),
        failures.join("\n")
    );
}

#[test]
fn gemma_3_270m_tokenizes_like_llama_cpp() {
    check_model("gemma-3-270m");
}

#[test]
fn qwen2_5_coder_0_5b_tokenizes_like_llama_cpp() {
    check_model("qwen2.5-coder-0.5b-instruct");
}

/// Special tokens are found in one pass over the text (one automaton over
/// all of them, the longest that starts at each place), and a text made of
/// near-misses splits nowhere; a text splits as its pieces do.
#[test]
fn special_tokens_are_split_in_one_pass() {
    let gguf = GgufFile::open(&common::model_path("gemma-3-270m")).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let start = tok.encode("<start_of_turn>", false, true);
    let end = tok.encode("<end_of_turn>", false, true);
    assert_eq!((start.len(), end.len()), (1, 1));
    let pieces = ["Hi ", "<start_of_turn>", "user", "<end_of_turn>", " there"];
    let whole = tok.encode(&pieces.concat(), false, true);
    let mut joined = Vec::new();
    for p in pieces {
        joined.extend(tok.encode(p, false, true));
    }
    assert_eq!(whole, joined);
    assert_eq!(whole.iter().filter(|&&t| t == start[0]).count(), 1);
    // With parsing off, control tokens are text.
    let plain = tok.encode(&pieces.concat(), false, false);
    assert!(!plain.contains(&start[0]) && !plain.contains(&end[0]));
    // Near-misses of every special token split nowhere.
    let misses = "<start_of_turn <end_of_turn <unused1 <|im_start| ".repeat(1000);
    let ids = tok.encode(&misses, false, true);
    assert!(!ids.contains(&start[0]) && !ids.contains(&end[0]));
}
