//! The accelerator catalogue: published figures per accelerator (compute per
//! precision, memory, bandwidth, power) for energy estimates, the bench and
//! the simulator. A copy of the catalogue ships inside the binary
//! ([`Catalogue::builtin`], from `data/accelerators.toml`, itself a copy of
//! the project's shared `data/accelerators.toml`); a user file replaces it
//! ([`Catalogue::load`]).
//!
//! The file may write several `key = value` statements on a line separated
//! by `;`, which TOML itself does not allow; [`split_statements`] puts each
//! on its own line before parsing.

use std::path::Path;

use serde::Deserialize;

/// Watts per CPU core assumed when a pool of plain CPUs names no power
/// (about 500 W for a 128-core socket at full load).
pub const CPU_WATTS_PER_CORE: f64 = 10.0;

/// The id that names plain CPU cores; it has no catalogue entry.
pub const CPU: &str = "cpu";

/// The catalogue's text as built into the binary.
pub const BUILTIN_TEXT: &str = include_str!("../data/accelerators.toml");

/// Why the catalogue or a figure in it could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CatalogError {
    /// The file could not be read.
    #[error("cannot read the accelerator catalogue {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        message: String,
    },
    /// The text is not the catalogue's format.
    #[error("{0}")]
    Malformed(String),
    /// No entry has this id.
    #[error("no accelerator {0:?} in the catalogue")]
    Unknown(String),
    /// The entry has no published power.
    #[error("{0} has no published power")]
    NoPower(String),
}

/// One accelerator's published figures. A figure of 0 means "not
/// published" (the entry's `unsourced` list names those fields).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Accelerator {
    /// Short id that pools and `--power estimate:` name.
    pub id: String,
    /// Full product name.
    #[serde(default)]
    pub name: String,
    /// Maker.
    #[serde(default)]
    pub vendor: String,
    /// `gpu`, `npu`, `tpu`, `lpu`, ...
    #[serde(default)]
    pub kind: String,
    /// Dense BF16 TFLOPS.
    #[serde(default)]
    pub bf16_tflops: f64,
    /// Dense FP8 TFLOPS.
    #[serde(default)]
    pub fp8_tflops: f64,
    /// Dense INT8 TOPS.
    #[serde(default)]
    pub int8_tops: f64,
    /// Off-chip memory, GB.
    #[serde(default)]
    pub hbm_gb: f64,
    /// On-chip SRAM (L2 for GPUs), MB.
    #[serde(default)]
    pub sram_mb: f64,
    /// Memory bandwidth, TB/s (on-chip SRAM for SRAM-only designs).
    #[serde(default)]
    pub mem_bw_tbps: f64,
    /// Board power, watts.
    #[serde(default)]
    pub tdp_w: f64,
    /// Year of release.
    #[serde(default)]
    pub year: u32,
    /// Where the figures come from.
    #[serde(default)]
    pub source: String,
    /// Fields whose figure is not published.
    #[serde(default)]
    pub unsourced: Vec<String>,
}

#[derive(Deserialize)]
struct CatalogueFile {
    #[serde(default)]
    accelerator: Vec<Accelerator>,
}

/// Every accelerator of one catalogue file.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalogue {
    accelerators: Vec<Accelerator>,
}

impl Catalogue {
    /// Parses a catalogue's text.
    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let file: CatalogueFile = toml::from_str(&split_statements(text))
            .map_err(|e| CatalogError::Malformed(e.to_string()))?;
        Ok(Catalogue {
            accelerators: file.accelerator,
        })
    }

    /// The copy built into the binary.
    pub fn builtin() -> Result<Self, CatalogError> {
        Self::parse(BUILTIN_TEXT)
    }

    /// The catalogue in `path`, or the built-in one when there is none.
    pub fn load(path: Option<&Path>) -> Result<Self, CatalogError> {
        let Some(path) = path else {
            return Self::builtin();
        };
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text)
    }

    /// Every entry, in file order.
    pub fn accelerators(&self) -> &[Accelerator] {
        &self.accelerators
    }

    /// The entry with this id.
    pub fn get(&self, id: &str) -> Result<&Accelerator, CatalogError> {
        self.accelerators
            .iter()
            .find(|a| a.id == id)
            .ok_or_else(|| CatalogError::Unknown(id.to_owned()))
    }

    /// Published power of one `id` accelerator in watts; `cpu` is
    /// [`CPU_WATTS_PER_CORE`] (one core).
    pub fn published_watts(&self, id: &str) -> Result<f64, CatalogError> {
        if id == CPU {
            return Ok(CPU_WATTS_PER_CORE);
        }
        let entry = self.get(id)?;
        (entry.tdp_w > 0.0)
            .then_some(entry.tdp_w)
            .ok_or_else(|| CatalogError::NoPower(id.to_owned()))
    }
}

/// Puts each `;`-separated statement of a line on its own line
/// (semicolons inside strings and comments stay).
pub fn split_statements(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut escaped = false;
        for (i, c) in line.char_indices() {
            match c {
                '#' if !in_string => {
                    out.push_str(&line[i..]);
                    break;
                }
                '"' if !escaped => in_string = !in_string,
                ';' if !in_string => {
                    out.push('\n');
                    continue;
                }
                _ => {}
            }
            escaped = c == '\\' && !escaped;
            out.push(c);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn statements_split_outside_strings_and_comments() {
        let text = "a = \"x; y\"; b = 2 # c; d\n";
        let v: toml::Value = toml::from_str(&split_statements(text)).unwrap();
        assert_eq!(v["a"].as_str(), Some("x; y"));
        assert_eq!(v["b"].as_integer(), Some(2));
    }

    #[test]
    fn the_builtin_catalogue_has_every_entry_with_its_figures() {
        let catalogue = Catalogue::builtin().unwrap();
        let ids: Vec<&str> = catalogue
            .accelerators()
            .iter()
            .map(|a| a.id.as_str())
            .collect();
        let entries = BUILTIN_TEXT.matches("[[accelerator]]").count();
        assert_eq!(ids.len(), entries);
        assert!(
            ids.contains(&"h100-sxm") && ids.contains(&"rngd"),
            "{ids:?}"
        );
        let h100 = catalogue.get("h100-sxm").unwrap();
        assert_eq!(h100.tdp_w, 700.0);
        assert_eq!(h100.mem_bw_tbps, 3.35);
        assert_eq!(h100.hbm_gb, 80.0);
    }

    #[test]
    fn published_power_and_its_refusals() {
        let catalogue = Catalogue::builtin().unwrap();
        assert_eq!(catalogue.published_watts("h100-sxm").unwrap(), 700.0);
        assert_eq!(catalogue.published_watts(CPU).unwrap(), CPU_WATTS_PER_CORE);
        assert!(matches!(
            catalogue.published_watts("nope"),
            Err(CatalogError::Unknown(_))
        ));
        let unpublished = Catalogue::parse("[[accelerator]]\nid = \"x\"\ntdp_w = 0\n").unwrap();
        assert!(matches!(
            unpublished.published_watts("x"),
            Err(CatalogError::NoPower(_))
        ));
        assert!(matches!(
            Catalogue::parse("[[x"),
            Err(CatalogError::Malformed(_))
        ));
    }

    #[test]
    fn a_user_file_replaces_the_builtin_copy() {
        let dir = std::env::temp_dir().join(format!("accelerators-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mine.toml");
        std::fs::write(&file, "[[accelerator]]\nid = \"mine\"; tdp_w = 42\n").unwrap();
        let mine = Catalogue::load(Some(&file)).unwrap();
        assert_eq!(mine.published_watts("mine").unwrap(), 42.0);
        assert!(mine.get("h100-sxm").is_err());
        assert!(matches!(
            Catalogue::load(Some(&dir.join("absent.toml"))),
            Err(CatalogError::Read { .. })
        ));
        assert_eq!(
            Catalogue::load(None).unwrap(),
            Catalogue::builtin().unwrap()
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
