//! Turning prompts into token ids for routing: a Hugging Face
//! `tokenizer.json` (`--tokenizer PATH`, through the `tokenizers` crate,
//! built with its pure-Rust regex engine so nothing needs a C toolchain),
//! or the built-in tokenizer the mock engine uses.
//!
//! The frontend only tokenizes to hash the prompt's blocks; the worker
//! receives the request as the client sent it and tokenizes it itself. So
//! the two must agree: the model's own `tokenizer.json` for a real engine,
//! the built-in one for the mock engine. Chat messages are rendered with the
//! built-in template (`eventplane_kv::tokenize::render_chat`) before
//! tokenizing; a model's Jinja chat template is not applied.

use std::path::Path;

use eventplane_kv::tokenize;

/// A prompt tokenizer.
pub enum PromptTokenizer {
    /// One token per whitespace-separated word (`eventplane_kv::tokenize`).
    BuiltIn,
    /// A Hugging Face tokenizer.
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PromptTokenizer::BuiltIn => f.write_str("BuiltIn"),
            PromptTokenizer::HuggingFace(_) => f.write_str("HuggingFace"),
        }
    }
}

impl PromptTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let t = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("cannot load the tokenizer {}: {e}", path.display()))?;
        Ok(PromptTokenizer::HuggingFace(Box::new(t)))
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            PromptTokenizer::BuiltIn => Ok(tokenize::encode(text)),
            PromptTokenizer::HuggingFace(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| format!("the tokenizer failed on the prompt: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_hugging_face_tokenizer_json() {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":5,"world":6},"unk_token":"[UNK]"}}"#;
        let dir = std::env::temp_dir().join(format!("ep-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let t = PromptTokenizer::from_file(&path).unwrap();
        assert_eq!(t.encode("hello world nope").unwrap(), vec![5, 6, 0]);
        assert_eq!(
            PromptTokenizer::BuiltIn.encode("hello world").unwrap(),
            tokenize::encode("hello world")
        );
        let missing = PromptTokenizer::from_file(&dir.join("absent.json")).unwrap_err();
        assert!(missing.to_string().contains("absent.json"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
