//! neocloud's embedded inference engine.
//!
//! Loads GGUF models ([`gguf`]), tokenises ([`tokenizer`]), renders chat
//! templates ([`chat_template`]), runs the model forward on the CPU with our own
//! kernels ([`model`], [`kernels`], [`attention`], [`quant`]) over paged key/value memory
//! ([`kv_cache`]) and samples ([`sampler`]),
//! optionally under a grammar ([`json_grammar`]).
//! Getting models onto disk is the `neocloud-models` crate's work; nothing
//! here knows about HTTP.

pub mod attention;
pub mod chat_template;
pub mod cpu_executor;
pub mod error;
pub mod generation;
pub mod gguf;
pub mod integer_dot;
#[cfg(target_arch = "x86_64")]
mod integer_dot_avx2;
pub mod json_grammar;
pub mod kernels;
pub mod kv_cache;
pub mod model;
pub mod panel;
#[cfg(target_arch = "x86_64")]
mod panel_amx;
#[cfg(target_arch = "x86_64")]
mod panel_avx512;
pub mod quant;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;
pub mod unpacked;
#[cfg(target_arch = "x86_64")]
mod unpacked_avx512;

pub use error::EngineError;
