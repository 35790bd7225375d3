//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use neocloud_engine::model::Model;
use neocloud_engine::tokenizer::Tokenizer;
use neocloud_models::ModelStore;

/// Path of a catalogue model, pulling it into the cache (`$NEOCLOUD_HOME`) if needed.
pub fn model_path(name: &str) -> PathBuf {
    ModelStore::from_env()
        .pull(name, &mut |msg| eprintln!("{msg}"))
        .unwrap_or_else(|e| panic!("pulling {name}: {e}"))
}

/// Loads a catalogue model and its tokenizer.
pub fn load(name: &str) -> (Model, Tokenizer) {
    let (model, gguf) = Model::open(&model_path(name)).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    (model, tok)
}
