//! Rendered chat prompts equal llama.cpp's byte for byte
//! (`crates/testkit/reference/qwen2.5-coder-0.5b-instruct/chat_template.jsonl`),
//! and their token counts equal what llama.cpp reports as prompt tokens.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use neocloud_engine::chat_template::ChatTemplate;
use neocloud_engine::gguf::GgufFile;
use neocloud_engine::tokenizer::Tokenizer;

#[test]
fn qwen_chat_prompts_match_llama_cpp() {
    let name = "qwen2.5-coder-0.5b-instruct";
    let gguf = GgufFile::open(&common::model_path(name)).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let template = ChatTemplate::from_gguf(&gguf, "", "<|im_end|>")
        .unwrap()
        .unwrap();
    let lines = neocloud_testkit::reference_lines(name, "chat_template.jsonl");
    assert!(!lines.is_empty());
    for line in lines {
        let req = &line["request"];
        let messages = req["messages"].as_array().unwrap();
        let tools = req
            .get("tools")
            .and_then(|t| t.as_array())
            .map(|t| t.as_slice());
        let prompt = template.render(messages, tools, true).unwrap();
        assert_eq!(prompt, line["prompt"].as_str().unwrap(), "request {req}");
        let tokens = tok.encode(&prompt, true, true);
        assert_eq!(
            tokens.len() as u64,
            line["prompt_token_count"].as_u64().unwrap()
        );
    }
}

#[test]
fn gemma_without_a_template_gets_the_builtin_turn_format() {
    use neocloud_engine::generation::LoadedModel;
    let lm = LoadedModel::open(&common::model_path("gemma-3-270m")).unwrap();
    let template = lm.chat_template.as_ref().expect("built-in Gemma template");
    let messages = [serde_json::json!({"role": "user", "content": "Hi"})];
    let prompt = template.render(&messages, None, true).unwrap();
    assert_eq!(
        prompt,
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
    let tokens = lm.encode_chat_prompt(&prompt);
    let bos = lm.tokenizer.bos.unwrap();
    assert_eq!(tokens[0], bos);
    assert_ne!(
        tokens[1], bos,
        "BOS written by the template is not added twice"
    );
    let turn = lm.tokenizer.token_id("<start_of_turn>").unwrap();
    assert_eq!(tokens[1], turn);
    assert!(lm
        .tokenizer
        .end_of_generation()
        .contains(&lm.tokenizer.token_id("<end_of_turn>").unwrap()));
}
