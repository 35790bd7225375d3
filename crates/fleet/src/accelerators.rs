//! The accelerator catalogue (`accelerators.toml` in the shared data):
//! published power per accelerator, for energy estimates. The file writes
//! several `key = value` statements on a line, separated by `;`, which TOML
//! itself does not allow; [`split_statements`] puts each on its own line.

/// Watts per CPU core assumed when a pool of plain CPUs names no power
/// (about 500 W for a 128-core socket at full load).
pub const CPU_WATTS_PER_CORE: f64 = 10.0;

/// Why a figure could not be read from the catalogue.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CatalogError {
    /// The file is not the catalogue's format.
    #[error("{0}")]
    Malformed(String),
    /// No entry has this id.
    #[error("no accelerator {0:?} in the catalogue")]
    Unknown(String),
    /// The entry has no published power.
    #[error("{0} has no published power")]
    NoPower(String),
}

/// `tdp_w` of accelerator `id` in the catalogue's text.
pub fn published_watts(text: &str, id: &str) -> Result<f64, CatalogError> {
    let data: toml::Value = toml::from_str(&split_statements(text))
        .map_err(|e| CatalogError::Malformed(e.to_string()))?;
    let list = data.get("accelerator").and_then(|a| a.as_array());
    let entry = list
        .into_iter()
        .flatten()
        .find(|a| a.get("id").and_then(|i| i.as_str()) == Some(id))
        .ok_or_else(|| CatalogError::Unknown(id.to_owned()))?;
    entry
        .get("tdp_w")
        .and_then(|w| w.as_float().or_else(|| w.as_integer().map(|i| i as f64)))
        .filter(|w| *w > 0.0)
        .ok_or_else(|| CatalogError::NoPower(id.to_owned()))
}

/// The data file writes several `key = value` statements on one line,
/// separated by `;`, which TOML does not allow: each goes on its own line
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
    use super::*;

    fn catalogue() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/accelerators.toml");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn statements_split_outside_strings_and_comments() {
        let text = "a = \"x; y\"; b = 2 # c; d\n";
        let v: toml::Value = toml::from_str(&split_statements(text)).unwrap();
        assert_eq!(v["a"].as_str(), Some("x; y"));
        assert_eq!(v["b"].as_integer(), Some(2));
    }

    #[test]
    fn published_power_is_read_from_the_shared_catalogue() {
        let text = catalogue();
        assert_eq!(published_watts(&text, "h100-sxm").unwrap(), 700.0);
        assert!(matches!(
            published_watts(&text, "nope"),
            Err(CatalogError::Unknown(_))
        ));
        assert!(matches!(
            published_watts("[[x", "h100-sxm"),
            Err(CatalogError::Malformed(_))
        ));
    }
}
