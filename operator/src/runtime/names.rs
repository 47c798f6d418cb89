//! Object names and label values that must fit Kubernetes' length limits.

use sha2::{Digest, Sha256};

/// `name` when it fits in `max` characters, else a prefix and a hash of the whole, so distinct long names stay
/// distinct.
pub fn shorten(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let hash = Sha256::digest(name.as_bytes());
    let suffix: String = hash.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let prefix: String = name.chars().take(max - suffix.len() - 1).collect();
    format!("{}-{suffix}", prefix.trim_end_matches(['-', '.']))
}

/// The SHA-256 of `text` in hex: what a pod template's config-hash annotation carries.
pub fn content_hash(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_shortened_distinctly_and_short_ones_kept() {
        assert_eq!(shorten("abc", 63), "abc");
        let a = shorten(&"a".repeat(80), 63);
        let b = shorten(&format!("{}b", "a".repeat(79)), 63);
        assert_eq!(a.len(), 63);
        assert_ne!(a, b);
    }
}
