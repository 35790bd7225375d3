//! Feeds arbitrary bytes to the GGUF reader and, when they parse, to the
//! model, tokenizer and chat-template loaders: none may panic or allocate
//! without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use neocloud_engine::chat_template::ChatTemplate;
use neocloud_engine::gguf::GgufFile;
use neocloud_engine::model::Model;
use neocloud_engine::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::from_bytes(data.to_vec()) {
        for t in &file.tensors {
            let _ = file.tensor_bytes(t);
        }
        let _ = Model::load(&file);
        if let Ok(tok) = Tokenizer::from_gguf(&file) {
            let ids = tok.encode("Hello <s> world\n\t12345 é", true, true);
            let _ = tok.decode(&ids, true);
        }
        let _ = ChatTemplate::from_gguf(&file, "<s>", "</s>");
    }
});
