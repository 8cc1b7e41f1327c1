//! File-name patterns for cleanup roots: `*`, `?` and `[...]` classes matched against ONE
//! directory entry name, never a path.
//!
//! Written by hand rather than taken from the `glob` crate: `glob::Pattern` also understands `/`
//! and `**`, which a cleanup pattern must never mean, and would be a new dependency for ~80
//! lines. Matching works on bytes, so names that are not UTF-8 are matched (and never panic).
//! Pure: imports nothing but `std`; must not import any I/O.

use std::fmt;

/// A validated name pattern (see [`NamePattern::parse`]).
#[derive(Clone, PartialEq, Eq)]
pub struct NamePattern {
    source: String,
    tokens: Vec<Token>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Byte(u8),
    AnyOne,
    AnyRun,
    Class {
        negated: bool,
        ranges: Vec<(u8, u8)>,
    },
}

impl fmt::Debug for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamePattern({:?})", self.source)
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl NamePattern {
    /// Parses a pattern, refusing anything that could name more than one path component:
    /// `/`, `..`, a NUL byte, an empty pattern, or one that matches `.`/`..` themselves.
    /// The message says what to change.
    pub fn parse(source: &str) -> Result<Self, String> {
        if source.is_empty() {
            return Err("a pattern cannot be empty; write e.g. \"*.log.[0-9]*\"".into());
        }
        if source.contains('/') {
            return Err(format!(
                "pattern {source:?} contains '/': patterns match file names only (it would \
                 escape the root); configure another root instead"
            ));
        }
        if source.contains("..") {
            return Err(format!(
                "pattern {source:?} contains \"..\", which could name the parent directory; \
                 remove it"
            ));
        }
        if source.contains('\0') {
            return Err(format!("pattern {source:?} contains a NUL byte; remove it"));
        }
        if source == "." || source == "*" || source == "?" || source.starts_with(".*") {
            // A bare `*` would make a root's every file a victim; `.*` could match `.`/`..`.
            return Err(format!(
                "pattern {source:?} is too broad (it matches every name or dot entries); \
                 name the files, e.g. \"*.log.[0-9]*\" or \"*.tmp\""
            ));
        }
        let bytes = source.as_bytes();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'*' => {
                    if tokens.last() != Some(&Token::AnyRun) {
                        tokens.push(Token::AnyRun);
                    }
                    i += 1;
                }
                b'?' => {
                    tokens.push(Token::AnyOne);
                    i += 1;
                }
                b'[' => {
                    let (token, next) = parse_class(source, bytes, i + 1)?;
                    tokens.push(token);
                    i = next;
                }
                b'\\' => {
                    let Some(&b) = bytes.get(i + 1) else {
                        return Err(format!(
                            "pattern {source:?} ends with '\\'; escape a character or remove it"
                        ));
                    };
                    tokens.push(Token::Byte(b));
                    i += 2;
                }
                b => {
                    tokens.push(Token::Byte(b));
                    i += 1;
                }
            }
        }
        Ok(Self {
            source: source.to_owned(),
            tokens,
        })
    }

    /// The pattern as written in the config.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `name` (one directory entry name) matches. `.` and `..` never match.
    pub fn matches(&self, name: &[u8]) -> bool {
        if name == b"." || name == b".." || name.contains(&b'/') {
            return false;
        }
        // Iterative matching with one backtrack point (the last `*`): linear in practice and
        // never recursive, so a hostile name cannot blow the stack.
        let (mut p, mut n) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            match self.tokens.get(p) {
                Some(Token::AnyRun) => {
                    star = Some((p, n));
                    p += 1;
                    continue;
                }
                Some(t) if t.matches_one(name[n]) => {
                    p += 1;
                    n += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            }
        }
        self.tokens[p..].iter().all(|t| *t == Token::AnyRun)
    }
}

impl Token {
    fn matches_one(&self, b: u8) -> bool {
        match self {
            Token::Byte(x) => *x == b,
            Token::AnyOne => true,
            Token::AnyRun => false,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= b && b <= hi) != *negated
            }
        }
    }
}

/// Parses `[...]` starting after the `[`; returns the token and the index after `]`.
fn parse_class(source: &str, bytes: &[u8], mut i: usize) -> Result<(Token, usize), String> {
    let negated = matches!(bytes.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let start = i;
    loop {
        let Some(&b) = bytes.get(i) else {
            return Err(format!(
                "pattern {source:?} has a '[' without its ']'; close the class or escape it as \\["
            ));
        };
        if b == b']' && i > start {
            i += 1;
            break;
        }
        if !b.is_ascii() {
            return Err(format!(
                "pattern {source:?} has a non-ASCII character in a [...] class; list ASCII \
                 characters only"
            ));
        }
        if bytes.get(i + 1) == Some(&b'-') && bytes.get(i + 2).is_some_and(|&c| c != b']') {
            let hi = bytes[i + 2];
            if hi < b || !hi.is_ascii() {
                return Err(format!(
                    "pattern {source:?} has an empty range {}-{}; write the low end first",
                    char::from(b),
                    char::from(hi)
                ));
            }
            ranges.push((b, hi));
            i += 3;
        } else {
            ranges.push((b, b));
            i += 1;
        }
    }
    Ok((Token::Class { negated, ranges }, i))
}

#[cfg(test)]
mod tests {
    use super::NamePattern;

    fn m(p: &str, name: &str) -> bool {
        NamePattern::parse(p)
            .expect("valid pattern")
            .matches(name.as_bytes())
    }

    #[test]
    fn matches_rotated_logs_archives_and_temp_files() {
        assert!(m("*.log.[0-9]*", "app.log.1"));
        assert!(m("*.log.[0-9]*", "app.log.12.gz"));
        assert!(!m("*.log.[0-9]*", "app.log"));
        assert!(!m("*.log.[0-9]*", "app.log.x"));
        assert!(m("*.gz", "a.gz"));
        assert!(!m("*.gz", "a.gz.part"));
        assert!(m("*.tmp", ".hidden.tmp"));
        assert!(m("core.?", "core.7"));
        assert!(!m("core.?", "core.77"));
        assert!(m("x[!a-c]y", "xdy"));
        assert!(!m("x[!a-c]y", "xby"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("*a*b*c", "zzazzbzzc"));
        assert!(!m("*a*b*c", "zzazzbzz"));
    }

    #[test]
    fn never_matches_dot_entries_or_paths() {
        assert!(!m("*.tmp", ".."));
        assert!(!m("?.", ".."));
        assert!(!m("[.]", "."));
        assert!(!m("*.tmp", "a/b.tmp"));
    }

    #[test]
    fn refuses_patterns_that_could_escape_or_are_too_broad() {
        for bad in [
            "", "../*.log", "a/*.log", "*/x", "..", "*", ".*", "a[b", "a\\", "[z-a]",
        ] {
            assert!(NamePattern::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
