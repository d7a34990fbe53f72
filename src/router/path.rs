//! Path patterns and the segment trie that matches them.
//!
//! Patterns: `/users/me` (exact), `/users/{id}` (a named param matches one
//! non-empty segment), `/files/{*rest}` (a final catch-all matches the rest,
//! slashes included) and prefixes (`path_prefix: /api` matches `/api` and
//! `/api/...` but not `/apis`).

use super::{Matched, Rank};
use std::collections::HashMap;

/// Most params one template may capture.
pub const MAX_PARAMS: usize = 16;

// Segment codes for specificity ranking (higher is more specific).
const R_END: u8 = 5;
const R_LIT: u8 = 4;
const R_PARAM: u8 = 3;
const R_CATCH_ALL: u8 = 2;
const R_PREFIX: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Lit(Box<str>),
    Param(Box<str>),
    CatchAll(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    pub segs: Vec<Seg>,
    pub prefix: bool,
}

impl Pattern {
    /// Parses an exact path or template.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let body = s
            .strip_prefix('/')
            .ok_or_else(|| format!("`{s}` must start with `/`"))?;
        let mut segs = Vec::new();
        let parts: Vec<&str> = body.split('/').collect();
        let mut names = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                let (catch_all, name) = match inner.strip_prefix('*') {
                    Some(n) => (true, n),
                    None => (false, inner),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "`{{{inner}}}` in `{s}` is not a valid param name (letters, digits, `_`)"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!("param `{name}` appears twice in `{s}`"));
                }
                names.push(name);
                if catch_all {
                    if i + 1 != parts.len() {
                        return Err(format!(
                            "catch-all `{{*{name}}}` must be the last segment of `{s}`"
                        ));
                    }
                    segs.push(Seg::CatchAll(name.into()));
                } else {
                    segs.push(Seg::Param(name.into()));
                }
            } else if part.contains('{') || part.contains('}') {
                return Err(format!(
                    "segment `{part}` of `{s}`: a param must be a whole segment, like `{{id}}`"
                ));
            } else {
                segs.push(Seg::Lit((*part).into()));
            }
        }
        if names.len() > MAX_PARAMS {
            return Err(format!("`{s}` has more than {MAX_PARAMS} params"));
        }
        Ok(Pattern {
            segs,
            prefix: false,
        })
    }

    /// Parses a literal prefix (no params).
    pub fn parse_prefix(s: &str) -> Result<Pattern, String> {
        if !s.starts_with('/') {
            return Err(format!("`{s}` must start with `/`"));
        }
        if s.contains('{') || s.contains('}') {
            return Err(format!(
                "`{s}`: a prefix is literal; use `path` for templates"
            ));
        }
        let trimmed = s.trim_end_matches('/');
        let segs = if trimmed.is_empty() {
            vec![]
        } else {
            trimmed[1..]
                .split('/')
                .map(|p| Seg::Lit(p.into()))
                .collect()
        };
        Ok(Pattern { segs, prefix: true })
    }

    pub fn rank(&self) -> Box<[u8]> {
        let mut r: Vec<u8> = self
            .segs
            .iter()
            .map(|s| match s {
                Seg::Lit(_) => R_LIT,
                Seg::Param(_) => R_PARAM,
                Seg::CatchAll(_) => R_CATCH_ALL,
            })
            .collect();
        if self.prefix {
            r.push(R_PREFIX);
        } else if !matches!(self.segs.last(), Some(Seg::CatchAll(_))) {
            r.push(R_END);
        }
        r.into()
    }

    /// Param names in capture order.
    pub fn params(&self) -> Vec<&str> {
        self.segs
            .iter()
            .filter_map(|s| match s {
                Seg::Param(n) | Seg::CatchAll(n) => Some(&**n),
                Seg::Lit(_) => None,
            })
            .collect()
    }

    /// The pattern with params unnamed: two routes with equal shapes match
    /// exactly the same paths.
    pub fn shape(&self) -> String {
        let mut s = String::new();
        for seg in &self.segs {
            s.push('/');
            match seg {
                Seg::Lit(l) => s.push_str(l),
                Seg::Param(_) => s.push_str("{}"),
                Seg::CatchAll(_) => s.push_str("{*}"),
            }
        }
        if self.prefix {
            s.push_str("/**");
        }
        s
    }
}

/// Byte ranges of captured params in the matched path. Inline: no allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Captures {
    spans: [(u32, u32); MAX_PARAMS],
    len: u8,
}

impl Captures {
    fn push(&mut self, start: usize, end: usize) {
        self.spans[self.len as usize] = (start as u32, end as u32);
        self.len += 1;
    }

    fn pop(&mut self) {
        self.len -= 1;
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`-th captured value within `path`.
    pub fn get<'p>(&self, path: &'p str, i: usize) -> Option<&'p str> {
        if i >= self.len as usize {
            return None;
        }
        let (a, b) = self.spans[i];
        path.get(a as usize..b as usize)
    }
}

#[derive(Default)]
struct Node {
    lits: HashMap<Box<str>, Node>,
    param: Option<Box<Node>>,
    ends: Vec<(Rank, usize)>,
    catch_all: Vec<(Rank, usize)>,
    prefix: Vec<(Rank, usize)>,
}

#[derive(Default)]
pub struct PathTable {
    root: Node,
    max: Option<Rank>,
}

type Best<'t> = Option<(&'t Rank, Matched)>;

impl PathTable {
    pub fn insert(&mut self, pattern: &Pattern, route: usize, rank: Rank) {
        let mut node = &mut self.root;
        let mut list = None;
        for seg in &pattern.segs {
            match seg {
                Seg::Lit(l) => node = node.lits.entry(l.clone()).or_default(),
                Seg::Param(_) => node = node.param.get_or_insert_with(Default::default),
                Seg::CatchAll(_) => list = Some(&mut node.catch_all),
            }
            if list.is_some() {
                break;
            }
        }
        let list = match list {
            Some(l) => l,
            None if pattern.prefix => &mut node.prefix,
            None => &mut node.ends,
        };
        if self.max.as_ref().is_none_or(|m| rank > *m) {
            self.max = Some(rank.clone());
        }
        list.push((rank, route));
        list.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    }

    /// Whether some route here could outrank `best`.
    pub fn could_beat(&self, best: &Best<'_>) -> bool {
        match (&self.max, best) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(m), Some((b, _))) => m > *b,
        }
    }

    pub fn find<'t>(&'t self, path: &str, accept: &dyn Fn(usize) -> bool, best: &mut Best<'t>) {
        if !path.starts_with('/') {
            return;
        }
        let mut caps = Captures::default();
        visit(&self.root, path, Some(1), &mut caps, accept, best);
    }
}

fn consider<'t>(
    list: &'t [(Rank, usize)],
    caps: &Captures,
    accept: &dyn Fn(usize) -> bool,
    best: &mut Best<'t>,
) {
    for (rank, route) in list {
        if let Some((b, _)) = best {
            if rank <= *b {
                return;
            }
        }
        if accept(*route) {
            *best = Some((
                rank,
                Matched {
                    route: *route,
                    captures: *caps,
                },
            ));
            return;
        }
    }
}

fn visit<'t>(
    node: &'t Node,
    path: &str,
    pos: Option<usize>,
    caps: &mut Captures,
    accept: &dyn Fn(usize) -> bool,
    best: &mut Best<'t>,
) {
    match pos {
        None => consider(&node.ends, caps, accept, best),
        Some(i) => {
            let rest = &path[i..];
            let (seg, next) = match rest.find('/') {
                Some(j) => (&rest[..j], Some(i + j + 1)),
                None => (rest, None),
            };
            if let Some(child) = node.lits.get(seg) {
                visit(child, path, next, caps, accept, best);
            }
            if let Some(p) = &node.param {
                if !seg.is_empty() && (caps.len as usize) < MAX_PARAMS {
                    caps.push(i, i + seg.len());
                    visit(p, path, next, caps, accept, best);
                    caps.pop();
                }
            }
            if !node.catch_all.is_empty() {
                caps.push(i, path.len());
                consider(&node.catch_all, caps, accept, best);
                caps.pop();
            }
        }
    }
    consider(&node.prefix, caps, accept, best);
}
