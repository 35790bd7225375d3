//! `GET /v1/models`.

use serde::{Deserialize, Serialize};

/// One served model.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Model {
    /// The name clients send as `model`.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Who serves it.
    pub owned_by: String,
}

/// The list of served models.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models.
    pub data: Vec<Model>,
}
