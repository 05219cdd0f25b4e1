//! `[api]`: the backend API's settings, and its bearer keys from their three
//! sources.

use std::path::PathBuf;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Shortest accepted bearer key, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// `[api]`: the backend HTTP API (docs/operations.md). Off unless `listen`
/// is set; never served on the public port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the backend API listener (keep it private, like the
    /// admin one); empty: no backend API.
    pub listen: String,
    /// Bearer keys a backend may present (`Authorization: Bearer KEY`),
    /// each at least 16 visible ASCII characters; secrets, masked in
    /// `--print-config`. Every key of `keys`, `keys_file` and `keys_base64`
    /// is accepted (list the old and the new key while rotating).
    pub keys: Vec<String>,
    /// A file of more keys, one per line (blank lines and `#` comments
    /// skipped), read at start-up and on SIGHUP.
    pub keys_file: Option<PathBuf>,
    /// More keys: base64 of the same text as `keys_file` (for container
    /// environments); a secret, masked in `--print-config`.
    pub keys_base64: Option<String>,
    /// How long one request keeps trying to reach its receiver (its owner
    /// unreachable or moving, the store down, the handler answering
    /// `unavailable`), in ms; past it the answer is 503 with `Retry-After`.
    pub retry_deadline_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: String::new(),
            keys: Vec::new(),
            keys_file: None,
            keys_base64: None,
            retry_deadline_ms: 5_000,
        }
    }
}

/// Keys of a `keys_file`-style text: one per line, blank lines and `#`
/// comments skipped.
fn lines(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
}

impl ApiConfig {
    /// Whether the backend API is on.
    pub fn enabled(&self) -> bool {
        !self.listen.trim().is_empty()
    }

    /// Every accepted key (files read now). An error names the key at
    /// fault and never contains a key.
    pub fn load_keys(&self) -> Result<Vec<String>, (&'static str, String)> {
        let mut keys: Vec<(&'static str, String)> = self
            .keys
            .iter()
            .map(|k| ("api.keys", k.trim().to_owned()))
            .collect();
        if let Some(path) = &self.keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                (
                    "api.keys_file",
                    format!("cannot read the key file {}: {e}", path.display()),
                )
            })?;
            keys.extend(lines(&text).map(|k| ("api.keys_file", k)));
        }
        if let Some(b64) = self.keys_base64.as_deref().map(str::trim) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| ("api.keys_base64", format!("not base64: {e}")))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| ("api.keys_base64", "not UTF-8 text".to_owned()))?;
            keys.extend(lines(&text).map(|k| ("api.keys_base64", k)));
        }
        for (key, k) in &keys {
            if k.len() < MIN_KEY_BYTES || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((
                    key,
                    format!(
                        "a key is at least {MIN_KEY_BYTES} visible ASCII characters \
                         (no spaces); one is not"
                    ),
                ));
            }
        }
        Ok(keys.into_iter().map(|(_, k)| k).collect())
    }

    /// Checks what types alone cannot; answers the key at fault and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let keys = self.load_keys()?;
        if !self.enabled() {
            return Ok(());
        }
        self.listen.parse::<std::net::SocketAddr>().map_err(|e| {
            (
                "api.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9091: {e}",
                    self.listen
                ),
            )
        })?;
        if keys.is_empty() {
            return Err((
                "api.keys",
                "the backend API is on (api.listen) but no key is set \
                 (api.keys, api.keys_file or api.keys_base64)"
                    .to_owned(),
            ));
        }
        if self.retry_deadline_ms == 0 {
            return Err(("api.retry_deadline_ms", "must be greater than 0".to_owned()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_all_three_sources_and_bad_ones_are_named_not_shown() {
        let dir = std::env::temp_dir().join(format!("berth-api-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "# old, until the 1st\nfile-key-0123456789\n\n").unwrap();
        let c = ApiConfig {
            listen: "127.0.0.1:0".into(),
            keys: vec!["list-key-0123456789".into()],
            keys_file: Some(file),
            keys_base64: Some(
                base64::engine::general_purpose::STANDARD.encode("b64-key-0123456789\n"),
            ),
            ..ApiConfig::default()
        };
        assert_eq!(
            c.load_keys().unwrap(),
            [
                "list-key-0123456789",
                "file-key-0123456789",
                "b64-key-0123456789"
            ]
        );
        assert_eq!(c.validate(), Ok(()));
        let short = ApiConfig {
            keys: vec!["short secret".into()],
            ..c.clone()
        };
        let (key, why) = short.validate().unwrap_err();
        assert_eq!(key, "api.keys");
        assert!(!why.contains("short secret"), "{why}");
        let none = ApiConfig {
            listen: "127.0.0.1:0".into(),
            ..ApiConfig::default()
        };
        assert_eq!(none.validate().unwrap_err().0, "api.keys");
        assert_eq!(ApiConfig::default().validate(), Ok(()), "off by default");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
