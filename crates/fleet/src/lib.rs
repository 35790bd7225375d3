//! neocloud's fleet gateway: pools of upstreams (remote OpenAI-compatible
//! servers or the in-process engine) that serve a model, and the routing
//! policies that choose among them ([`policy`], pure functions over a
//! [`policy::FleetView`] snapshot, so that the planner can run the same
//! code on a simulated fleet). [`config`] reads `fleet.toml`.

pub mod accounting;
pub mod config;
pub mod conformance;
pub mod error;
pub mod health;
pub mod metrics;
pub mod policy;
pub mod route;

pub use error::FleetError;
