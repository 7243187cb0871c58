//! The built-in tokenizer: deterministic, dependency-free, and shared by the
//! mock engine and the router (when no Hugging Face `tokenizer.json` is
//! given), so both turn the same text into the same token ids and the same
//! block hashes.
//!
//! Encoding: the text is split on Unicode whitespace; each word becomes one
//! token, `1 + XXH3-64(word's UTF-8 bytes, seed 1337) mod (VOCAB - 1)`.
//! Token 0 is never produced. Equal words give equal tokens anywhere, so
//! prompts sharing a textual prefix share a token prefix.
//!
//! Decoding (for the mock engine's generated text): each token becomes a
//! pronounceable word of two or three syllables chosen by its id, words
//! separated by one space. Decoding is not the inverse of encoding; it only
//! needs to be deterministic and readable.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::hash::HASH_SEED;

/// Token ids are below this.
pub const VOCAB: u32 = 32_000;

/// The built-in chat template: one `role: content` line per message, then
/// `assistant:`. The mock engine and the frontend both apply it, so a chat
/// request hashes the same on both sides.
pub fn render_chat<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut text = String::new();
    for (role, content) in messages {
        text.push_str(role);
        text.push_str(": ");
        text.push_str(content);
        text.push('\n');
    }
    text.push_str("assistant:");
    text
}

/// Token ids of `text`.
pub fn encode(text: &str) -> Vec<u32> {
    text.split_whitespace().map(word_token).collect()
}

/// The token of one word.
pub fn word_token(word: &str) -> u32 {
    1 + (xxh3_64_with_seed(word.as_bytes(), HASH_SEED) % u64::from(VOCAB - 1)) as u32
}

const SYLLABLES: [&str; 32] = [
    "ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "da", "fi", "go", "hu", "ja", "ke", "li", "mo",
    "na", "pe", "qui", "ro", "su", "ta", "ve", "wo", "xa", "yo", "ze", "bi", "co", "du", "el",
    "or",
];

/// Readable text for `tokens`.
pub fn decode(tokens: &[u32]) -> String {
    let mut out = String::with_capacity(tokens.len() * 7);
    for (i, &t) in tokens.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&decode_one(t));
    }
    out
}

/// Readable text for one token.
pub fn decode_one(token: u32) -> String {
    let n = SYLLABLES.len() as u32;
    let mut word = String::new();
    word.push_str(SYLLABLES[(token % n) as usize]);
    word.push_str(SYLLABLES[(token / n % n) as usize]);
    if token >= n * n {
        word.push_str(SYLLABLES[(token / (n * n) % n) as usize]);
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_map_to_stable_nonzero_tokens() {
        let a = encode("the cat  sat\non the mat");
        assert_eq!(a.len(), 6);
        assert_eq!(a[0], a[4], "equal words, equal tokens");
        assert!(a.iter().all(|&t| t > 0 && t < VOCAB));
        assert_eq!(encode(""), Vec::<u32>::new());
        // Pinned, so a change to the scheme is a visible test failure.
        assert_eq!(word_token("hello"), 10710);
        assert_eq!(
            encode("hello world"),
            vec![word_token("hello"), word_token("world")]
        );
    }

    #[test]
    fn decoding_is_deterministic_and_readable() {
        assert_eq!(decode(&[0, 1, 33]), "kaka loka lolo");
        assert_eq!(decode(&[31_999]), decode(&[31_999]));
        assert!(decode(&[31_999]).chars().all(|c| c.is_ascii_lowercase()));
    }
}
