//! model_source
