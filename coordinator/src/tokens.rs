//! Bearer tokens: credentials for automation that cannot hold a client certificate, and the
//! one break-glass credential.
//!
//! A token file (`interlock serve --token-file`) holds one `NAME SHA256HEX` a line: the
//! operator name a token authenticates as (its role comes from the policy's
//! `[access.operators]`, like a certificate's) and the SHA-256 of the token, never the token
//! itself. The break-glass file (`--break-glass-file`) holds only the hash of one token, which
//! acts as operator `break-glass` with the admin role whatever the policy says; the server
//! audits and alerts every use. Tokens are only accepted over TLS, from a caller that
//! presented no client certificate, and only for the operator API: a token is never a host.
//!
//! Parsing and lookup are pure; files are read by the caller. [`new_token`] reads the
//! kernel's random device.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

use crate::identity::{BREAK_GLASS, Identity, valid_name};

/// A new token: 32 bytes from the kernel's CSPRNG, hex. Read from /dev/urandom directly: one
/// fixed-size read needs no random-number crate.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The hex SHA-256 of a token, as the files store it.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The tokens the coordinator accepts, by hash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    by_hash: BTreeMap<String, String>,
}

impl Tokens {
    /// Parses a token file; every bad line is reported with its number and what to change.
    pub fn parse(text: &str) -> Result<Tokens, Vec<String>> {
        let mut by_hash = BTreeMap::new();
        let mut bad = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(name), Some(h), None) if valid_name(name) && is_hash(h) => {
                    if name == BREAK_GLASS {
                        bad.push(format!(
                            "line {n}: {BREAK_GLASS:?} is reserved for --break-glass-file"
                        ));
                    } else if by_hash
                        .insert(h.to_ascii_lowercase(), name.to_owned())
                        .is_some()
                    {
                        bad.push(format!("line {n}: this hash is listed twice"));
                    }
                }
                _ => bad.push(format!(
                    "line {n}: expected `NAME SHA256HEX` (`interlock tokens new NAME --file F` \
                     writes one)"
                )),
            }
        }
        if bad.is_empty() {
            Ok(Tokens { by_hash })
        } else {
            Err(bad)
        }
    }

    /// Adds the break-glass token's hash (the whole content of the break-glass file).
    pub fn with_break_glass(mut self, text: &str) -> Result<Tokens, String> {
        let h = text.trim();
        if !is_hash(h) {
            return Err(
                "the break-glass file must hold one SHA-256 hex digest (`interlock tokens \
                 break-glass --file F` writes it)"
                    .into(),
            );
        }
        self.by_hash
            .insert(h.to_ascii_lowercase(), BREAK_GLASS.to_owned());
        Ok(self)
    }

    /// The operator a presented token authenticates, if any.
    pub fn identify(&self, token: &str) -> Option<Identity> {
        self.by_hash
            .get(&hash(token))
            .map(|name| Identity::Operator(name.clone()))
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_known_by_its_hash_only() {
        let h = hash("s3cret");
        let t = Tokens::parse(&format!("# ci\nci-bot {h}\n\n")).expect("parse");
        assert_eq!(
            t.identify("s3cret"),
            Some(Identity::Operator("ci-bot".into()))
        );
        assert_eq!(t.identify("S3cret"), None);
        assert_eq!(t.identify(&h), None, "the hash itself is not the token");
    }

    #[test]
    fn bad_lines_are_all_reported_and_break_glass_is_reserved() {
        let h = hash("x");
        let text = format!(
            "ci {h}\nnohash\nbad name {h}\nbreak-glass {}\nci2 {h}\n",
            hash("y")
        );
        let errors = Tokens::parse(&text).expect_err("bad");
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("line 2"), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("reserved")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("twice")), "{errors:?}");
    }

    #[test]
    fn the_break_glass_token_acts_as_break_glass() {
        let t = Tokens::default()
            .with_break_glass(&format!("{}\n", hash("glass")))
            .expect("hash");
        assert_eq!(
            t.identify("glass"),
            Some(Identity::Operator(BREAK_GLASS.into()))
        );
        assert!(Tokens::default().with_break_glass("not a hash").is_err());
    }
}
