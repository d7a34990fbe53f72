//! Path rewrites applied before a request goes upstream.

use crate::policy::Ctx;
use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Lit(String),
    /// Index of a captured param of the route's path template.
    Param(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Rewrite {
    /// Remove a leading prefix (segment-aware); `/api/users` → `/users`.
    StripPrefix(String),
    /// Replace a leading prefix; `/api/users` → `/internal/users`.
    ReplacePrefix { from: String, to: String },
    /// Build the whole path from literals and captured params.
    Template(Vec<Piece>),
}

/// `path` minus `prefix` when `prefix` covers whole segments of it.
fn after_prefix<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

impl Rewrite {
    pub fn apply<'p>(&self, path: &'p str, ctx: &Ctx) -> Cow<'p, str> {
        match self {
            Rewrite::StripPrefix(prefix) => match after_prefix(path, prefix) {
                Some("") => Cow::Borrowed("/"),
                Some(rest) => Cow::Borrowed(rest),
                None => Cow::Borrowed(path),
            },
            Rewrite::ReplacePrefix { from, to } => match after_prefix(path, from) {
                Some(rest) => {
                    let to = to.trim_end_matches('/');
                    let mut s = String::with_capacity(to.len() + rest.len() + 1);
                    s.push_str(to);
                    s.push_str(rest);
                    if s.is_empty() {
                        s.push('/');
                    }
                    Cow::Owned(s)
                }
                None => Cow::Borrowed(path),
            },
            Rewrite::Template(pieces) => {
                let mut s = String::with_capacity(path.len() + 16);
                for p in pieces {
                    match p {
                        Piece::Lit(l) => s.push_str(l),
                        Piece::Param(i) => s.push_str(ctx.param(*i).unwrap_or("")),
                    }
                }
                Cow::Owned(s)
            }
        }
    }
}

/// Splits a rewrite template into pieces; `names` are the route's params.
pub fn parse_template(t: &str, names: &[&str]) -> Result<Vec<Piece>, String> {
    if !t.starts_with('/') {
        return Err(format!("`{t}` must start with `/`"));
    }
    let mut pieces = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            pieces.push(Piece::Lit(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("`{t}`: unclosed `{{`"))?
            + open;
        let name = rest[open + 1..close].trim_start_matches('*');
        let idx = names.iter().position(|n| *n == name).ok_or_else(|| {
            format!(
                "`{{{name}}}` is not a param of this route's path (params: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })?;
        pieces.push(Piece::Param(idx));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest.to_string()));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_prefix_is_segment_aware() {
        assert_eq!(after_prefix("/api/users", "/api"), Some("/users"));
        assert_eq!(after_prefix("/api", "/api/"), Some(""));
        assert_eq!(after_prefix("/apis", "/api"), None);
    }

    #[test]
    fn template_parsing() {
        let p = parse_template("/internal/users/{id}/posts", &["id"]).unwrap();
        assert_eq!(
            p,
            vec![
                Piece::Lit("/internal/users/".into()),
                Piece::Param(0),
                Piece::Lit("/posts".into())
            ]
        );
        assert!(parse_template("/x/{nope}", &["id"])
            .unwrap_err()
            .contains("not a param"));
        assert!(parse_template("x", &[]).is_err());
    }
}
