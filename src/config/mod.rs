//! Configuration: reading a YAML file into [`model::Config`] with precise
//! errors. Semantic checks (references, ambiguity, impossible values) happen
//! in the compiler ([`crate::snapshot`]), which reports through the same
//! [`ConfigError`] type using the [`position::Positions`] index. The other
//! files a configuration names are read by the compiler, through
//! [`inputs::read`], which records them for reloads and the file watcher.

pub mod inputs;
pub mod interpolate;
pub mod model;
pub mod position;
pub mod units;

use position::Positions;
use std::fmt;
use std::path::Path;

pub use model::Config;

/// One problem in a configuration file, located as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Key path such as `routes[3].match.path`; empty for whole-file errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All the problems found in one file (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A parsed configuration together with what is needed to report errors
/// against its source.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub file: String,
    pub positions: Positions,
    /// Hash of the interpolated source. A snapshot's identity combines it
    /// with the files the configuration names (`inputs::Inputs::identity`).
    pub hash: u64,
    /// The file as written, before `${VAR}` interpolation (same lines).
    pub source: String,
}

impl Loaded {
    /// The line holding the key at `path` as written in the file, before
    /// interpolation: to check that a secret comes from the environment.
    pub fn raw_line(&self, path: &str) -> Option<String> {
        let (line, _) = self.positions.find(path)?;
        self.source
            .lines()
            .nth(line.checked_sub(1)?)
            .map(String::from)
    }

    /// An error located at `path` (or its nearest located ancestor).
    pub fn error(&self, path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let path = path.into();
        let (line, column) = self.positions.find(&path).unwrap_or((0, 0));
        ConfigError {
            file: self.file.clone(),
            line,
            column,
            path,
            message: message.into(),
        }
    }
}

/// Reads and parses `path`, interpolating `${VAR}` from the process environment.
pub fn load_file(path: &Path) -> Result<Loaded, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    parse_str(&file, &text, |name| std::env::var(name).ok())
}

/// Parses configuration text; `file` is only used in error messages.
pub fn parse_str(
    file: &str,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigErrors> {
    let one = |line, column, path: String, message: String| {
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line,
            column,
            path,
            message,
        }])
    };
    let source = text.to_string();
    let text = interpolate::interpolate(text, &env).map_err(|(line, col, msg)| {
        // Name the key holding the bad reference: index the text as it would
        // read with every variable set (interpolation keeps line numbers).
        let lenient = interpolate::interpolate(text, |_| Some(String::new()));
        let path = Positions::index(lenient.as_deref().unwrap_or(text))
            .path_at(line, col)
            .unwrap_or_default();
        one(line, col, path, msg)
    })?;
    let positions = Positions::index(&text);
    let config: Config = match serde_yaml::from_str(&text) {
        Ok(c) => c,
        Err(err) => {
            let (line, column) = err.location().map_or((0, 0), |l| (l.line(), l.column()));
            // serde_yaml renders "path: message at line N column M"; split
            // the key path out and drop the position (printed up front).
            let mut message = err.to_string();
            if let Some(cut) = message.find(" at line ") {
                message.truncate(cut);
            }
            let (mut path, message) = match message.split_once(": ") {
                Some((p, m)) if !p.contains(' ') && !p.is_empty() => (p.to_string(), m.to_string()),
                _ => (String::new(), message),
            };
            // serde names the mapping that holds an unknown key; the key
            // itself is the more useful path (`routes[0].match.pth`).
            if let Some((field, _)) = message
                .strip_prefix("unknown field `")
                .and_then(|m| m.split_once('`'))
            {
                path = if path.is_empty() {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                };
            }
            return Err(one(line, column, path, message));
        }
    };
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    };
    Ok(Loaded {
        config,
        file: file.to_string(),
        positions,
        hash,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Loaded, ConfigErrors> {
        parse_str("test.yaml", text, |_| None)
    }

    #[test]
    fn unknown_key_is_located() {
        let err =
            parse("routes:\n  - name: a\n    match:\n      pth: /x\n    action: {echo: {}}\n")
                .unwrap_err();
        let e = &err.0[0];
        assert_eq!(e.line, 4, "{e}");
        assert_eq!(e.path, "routes[0].match.pth", "{e}");
        assert!(e.message.contains("unknown field `pth`"), "{e}");
        assert!(e.to_string().starts_with("test.yaml:4:"), "{e}");
    }

    #[test]
    fn bad_duration_is_located() {
        let err = parse(
            "upstreams:\n  - name: u\n    targets: [{address: '127.0.0.1:1'}]\n    timeouts:\n      connect: 5x\n",
        )
        .unwrap_err();
        let e = &err.0[0];
        assert_eq!(e.line, 5, "{e}");
        assert_eq!(e.path, "upstreams[0].timeouts.connect");
        assert!(e.message.contains("unknown unit"), "{e}");
    }

    #[test]
    fn missing_variable_names_its_key() {
        let err = parse("listeners:\n  - name: main\n    address: ${NOPE}\n").unwrap_err();
        let e = &err.0[0];
        assert_eq!((e.line, e.column), (3, 14), "{e}");
        assert_eq!(e.path, "listeners[0].address", "{e}");
        let err =
            parse("upstreams:\n  - name: u\n    targets: [{address: '${H}:80'}]\n").unwrap_err();
        assert_eq!(err.0[0].path, "upstreams[0].targets[0].address", "{}", err);
        let err = parse("upstreams:\n  - name: u\n    targets:\n      - address: \"${H}:80\"\n")
            .unwrap_err();
        assert_eq!(err.0[0].path, "upstreams[0].targets[0].address", "{}", err);
    }

    #[test]
    fn syntax_error_is_located() {
        let err = parse("listeners:\n  - name: [\n").unwrap_err();
        assert!(err.0[0].line >= 2, "{}", err);
    }
}
