//! Maps key paths (`routes[3].match.path`) to their line and column in the
//! YAML source, so that errors found after deserialization (semantic checks in
//! the compiler) can point at the exact place in the file.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Default)]
pub struct Positions {
    map: HashMap<String, (usize, usize)>,
}

enum Frame {
    Map { key: Option<String>, want_key: bool },
    Seq { index: usize },
}

struct Builder {
    stack: Vec<Frame>,
    out: HashMap<String, (usize, usize)>,
}

impl Builder {
    fn path(&self) -> String {
        let mut p = String::new();
        for f in &self.stack {
            match f {
                Frame::Map { key: Some(k), .. } => {
                    if !p.is_empty() {
                        p.push('.');
                    }
                    p.push_str(k);
                }
                Frame::Map { key: None, .. } => {}
                Frame::Seq { index } => {
                    p.push('[');
                    p.push_str(&index.to_string());
                    p.push(']');
                }
            }
        }
        p
    }

    /// Called when a value node starts; records its position (unless the
    /// parent mapping already recorded the key's position) and advances the parent.
    fn value_at(&mut self, mark: Marker) {
        if let Some(Frame::Seq { .. }) = self.stack.last() {
            let path = self.path();
            self.out
                .entry(path)
                .or_insert((mark.line(), mark.col() + 1));
        }
    }

    fn after_value(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { want_key, .. }) => *want_key = true,
            Some(Frame::Seq { index }) => *index += 1,
            None => {}
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        // A scalar in key position of a mapping names the next entry.
        if let Event::Scalar(ref s, ..) = ev {
            let first_key = match self.stack.last() {
                Some(Frame::Map {
                    key,
                    want_key: true,
                }) => Some(key.is_none()),
                _ => None,
            };
            if let Some(first) = first_key {
                let at = (mark.line(), mark.col() + 1);
                // A block mapping's start is marked at its first `:`, after
                // its first key: an item of a sequence starts at that key
                // (a flow mapping's `{` is earlier and stays).
                let n = self.stack.len();
                if first && n >= 2 && matches!(self.stack[n - 2], Frame::Seq { .. }) {
                    let item = self.path();
                    if let Some(pos) = self.out.get_mut(&item) {
                        *pos = (*pos).min(at);
                    }
                }
                if let Some(Frame::Map { key, want_key }) = self.stack.last_mut() {
                    *key = Some(s.clone());
                    *want_key = false;
                }
                let path = self.path();
                self.out.entry(path).or_insert(at);
                return;
            }
        }
        match ev {
            Event::Scalar(..) | Event::Alias(_) => {
                self.value_at(mark);
                self.after_value();
            }
            Event::MappingStart(..) => {
                self.value_at(mark);
                self.stack.push(Frame::Map {
                    key: None,
                    want_key: true,
                });
            }
            Event::SequenceStart(..) => {
                self.value_at(mark);
                self.stack.push(Frame::Seq { index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.after_value();
            }
            _ => {}
        }
    }
}

impl Positions {
    /// Builds the index. A YAML syntax error yields an empty index: serde will
    /// report that error itself, with its position.
    pub fn index(source: &str) -> Positions {
        let mut b = Builder {
            stack: Vec::new(),
            out: HashMap::new(),
        };
        let mut parser = Parser::new_from_str(source);
        let _ = parser.load(&mut b, false);
        Positions { map: b.out }
    }

    /// The key path whose value holds `line`:`column`, in the common case:
    /// the deepest path starting on the last line at or before it (block
    /// collections are marked late, so depth beats column on one line).
    pub fn path_at(&self, line: usize, column: usize) -> Option<String> {
        let depth = |p: &str| p.matches(['.', '[']).count();
        self.map
            .iter()
            .filter(|(_, pos)| **pos <= (line, column))
            .max_by_key(|(p, pos)| (pos.0, depth(p), pos.1))
            .map(|(p, _)| p.clone())
    }

    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(pos) = self.map.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_items() {
        let src = "a: 1\nroutes:\n  - name: x\n    match:\n      path: /a\n  - name: y\n    match: {path: /b}\n";
        let p = Positions::index(src);
        assert_eq!(p.find("a"), Some((1, 1)));
        assert_eq!(p.find("routes[0].name"), Some((3, 5)));
        assert_eq!(p.find("routes[0].match.path"), Some((5, 7)));
        assert_eq!(p.find("routes[1].name"), Some((6, 5)));
        assert_eq!(p.find("routes[1].match.path").map(|p| p.0), Some(7));
        // Unknown leaf: falls back to the nearest ancestor.
        assert_eq!(p.find("routes[1].match.nope").map(|p| p.0), Some(7));
    }

    #[test]
    fn sequence_items_start_at_their_first_character() {
        let src = "calls:\n  - name: a\n    path: /a\n  - {name: b, path: /b}\n  -   x: 1\n";
        let p = Positions::index(src);
        // A block mapping item: its first key, not its first `:`.
        assert_eq!(p.find("calls[0]"), Some((2, 5)));
        // A flow mapping item: its `{`.
        assert_eq!(p.find("calls[1]"), Some((4, 5)));
        assert_eq!(p.find("calls[1].path"), Some((4, 15)));
        assert_eq!(p.find("calls[2]"), Some((5, 7)));
    }
}
