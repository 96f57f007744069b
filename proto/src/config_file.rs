//! Reading a TOML configuration file (a merchant's, the coordinator's, a scenario), with
//! errors that name the file, and the rule every one of them follows: a relative path in
//! the file is taken relative to the file's folder, not to where the program runs.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that could not be read, or that says something invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl ConfigFileError {
    /// `message` about the file at `path`.
    pub fn invalid(path: &Path, message: impl Into<String>) -> Self {
        Self::Invalid { path: path.display().to_string(), message: message.into() }
    }
}

/// The file's text.
pub fn read(path: &Path) -> Result<String, ConfigFileError> {
    std::fs::read_to_string(path)
        .map_err(|source| ConfigFileError::Read { path: path.display().to_string(), source })
}

/// The file, read and deserialised (a misspelt key is refused where `T` denies unknown
/// fields; serde's message names it).
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    toml::from_str(&read(path)?).map_err(|e| ConfigFileError::invalid(path, e.to_string()))
}

/// Makes each relative path of `paths` relative to the folder of the file at `file`.
pub fn resolve_relative<'a>(file: &Path, paths: impl IntoIterator<Item = &'a mut PathBuf>) {
    let base = file.parent().unwrap_or(Path::new("."));
    for p in paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        store: PathBuf,
    }

    /// A missing file and a misspelt key are each refused naming the file (and the key);
    /// a relative path follows the file, an absolute one is kept.
    #[test]
    fn errors_name_the_file_and_relative_paths_follow_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.toml");
        let err = load::<Settings>(&missing).expect_err("no such file");
        assert!(
            matches!(err, ConfigFileError::Read { .. }) && err.to_string().contains("missing.toml"),
            "{err}"
        );

        let path = dir.path().join("conf").join("settings.toml");
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("mkdir");
        std::fs::write(&path, "stor = \"db\"\n").expect("write");
        let err = load::<Settings>(&path).expect_err("a misspelt key");
        let text = err.to_string();
        assert!(matches!(err, ConfigFileError::Invalid { .. }), "{text}");
        assert!(text.contains("settings.toml") && text.contains("stor"), "{text}");

        std::fs::write(&path, "store = \"db\"\n").expect("write");
        let mut settings: Settings = load(&path).expect("valid");
        let mut absolute = dir.path().join("elsewhere");
        resolve_relative(&path, [&mut settings.store, &mut absolute]);
        assert_eq!(settings.store, dir.path().join("conf").join("db"));
        assert_eq!(absolute, dir.path().join("elsewhere"));
    }
}
