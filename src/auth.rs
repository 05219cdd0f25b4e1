//! Client credentials: the JWT a `hello` may carry (`hello.credential`).
//!
//! The edge that receives a `hello` verifies its credential here, before any
//! routing: pure CPU, no network, with keys loaded at start-up (`[auth]` in
//! the configuration). What comes out is the token's subject (`sub`), which
//! travels with the attach to the session's owner; the owner's actor binds a
//! new session to it and refuses a resume by another subject (or by none), so
//! the rule holds wherever the `hello` landed (`berth_actors::session`).
//!
//! What is checked, in this order: the token's size (`auth.max_token_bytes`,
//! before anything is parsed), its shape and header, its algorithm (HS256,
//! RS256 or ES256, and only those a key is configured for), its signature
//! (every configured key of that algorithm is tried: several keys are how
//! keys are rotated), then its claims: `exp` always (and required), `nbf`
//! when present, `aud` and `iss` when configured (then required too), each
//! with `auth.leeway_s` of clock skew, and a non-empty string `sub`.
//!
//! Every refusal has a [`Refusal`] kind, the `reason` label of
//! `berth_auth_failures_total`; the client is told `bad_token` and the
//! connection closes with 1008, as for a wrong resume token. The one reason
//! not decided here, `subject` (a resume by another subject than the
//! session's, or by none), is counted by the node that holds the session.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Shortest HS256 secret accepted, in bytes: RFC 7518 section 3.2 asks for a
/// key at least as long as the hash output.
pub const MIN_HS256_SECRET: usize = 32;

/// Why a `hello`'s credential (or its absence) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `auth.required` and the `hello` carried no credential.
    #[error("a credential is required: send hello.credential")]
    Required,
    /// Outside its validity window: past `exp`, or before `nbf` (with the
    /// configured leeway).
    #[error("the credential has expired or is not valid yet")]
    Expired,
    /// No configured key of the token's algorithm verifies its signature
    /// (or no key is configured for that algorithm at all).
    #[error("the credential's signature does not verify with any configured key")]
    Signature,
    /// Its `aud` is missing or does not name `auth.audience`.
    #[error("the credential is not for this audience")]
    Audience,
    /// Its `iss` is missing or is not `auth.issuer`.
    #[error("the credential is from another issuer")]
    Issuer,
    /// Not a JWT this node reads: too long, not three base64url parts, bad
    /// JSON, a claim of the wrong type, no `exp`, no string `sub`.
    #[error("the credential is not a well-formed JWT with exp and sub")]
    Malformed,
}

impl Refusal {
    /// The `reason` label of `berth_auth_failures_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Required => "required",
            Refusal::Expired => "expired",
            Refusal::Signature => "signature",
            Refusal::Audience => "audience",
            Refusal::Issuer => "issuer",
            Refusal::Malformed => "malformed",
        }
    }

    /// What a verification error of the library means for the client.
    fn of(kind: &ErrorKind) -> Refusal {
        match kind {
            ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => Refusal::Expired,
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat => Refusal::Signature,
            ErrorKind::InvalidAudience => Refusal::Audience,
            ErrorKind::InvalidIssuer => Refusal::Issuer,
            // A configured `aud`/`iss` that the token lacks, or carries as
            // something other than a string (the claim's name is a field of
            // the error, not its text).
            ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) if c == "aud" => {
                Refusal::Audience
            }
            ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) if c == "iss" => {
                Refusal::Issuer
            }
            _ => Refusal::Malformed,
        }
    }
}

/// A key that could not be loaded at start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The HS256 secret is too short to be a key.
    #[error("the HS256 secret has {0} bytes; at least {MIN_HS256_SECRET} are needed")]
    ShortSecret(usize),
    /// The public keys input holds no PEM block.
    #[error("no PEM block (-----BEGIN PUBLIC KEY-----) found")]
    NoPem,
    /// A PEM block that is not an RSA or P-256 public key.
    #[error("PEM block {index} ({label}): {why}")]
    BadKey {
        /// Its position in the input, from 1.
        index: usize,
        /// Its label (`PUBLIC KEY`, `RSA PUBLIC KEY`, ...).
        label: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// What a [`Verifier`] is built from (the `[auth]` section, keys already read).
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// Refuse a `hello` without a credential.
    pub required: bool,
    /// The HS256 secret's bytes.
    pub hs256_secret: Option<Vec<u8>>,
    /// PEM text of one or more RSA (RS256) or P-256 (ES256) public keys.
    pub public_keys_pem: Option<Vec<u8>>,
    /// The `aud` a token must name, if any.
    pub audience: Option<String>,
    /// The `iss` a token must carry, if any.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// Longest credential read, in bytes.
    pub max_token_bytes: usize,
}

/// Verifies credentials (see the module docs). Built once at start-up.
pub struct Verifier {
    required: bool,
    /// Every configured key with its one algorithm.
    keys: Vec<(Algorithm, DecodingKey)>,
    /// The claim rules, per algorithm a key is configured for.
    rules: Vec<(Algorithm, Validation)>,
    max_token_bytes: usize,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("required", &self.required)
            .field(
                "keys",
                &self.keys.iter().map(|(a, _)| a).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The claims berth reads (the library checks the registered ones).
#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl Verifier {
    /// Loads the keys; an error says which input is wrong and why.
    pub fn new(s: &AuthSettings) -> Result<Verifier, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = &s.hs256_secret {
            if secret.len() < MIN_HS256_SECRET {
                return Err(KeyError::ShortSecret(secret.len()));
            }
            let key = DecodingKey::from_secret(secret).map_err(|_| KeyError::ShortSecret(0))?;
            keys.push((Algorithm::HS256, key));
        }
        if let Some(pem) = &s.public_keys_pem {
            keys.extend(public_keys(pem)?);
        }
        let mut rules = Vec::new();
        for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
            if keys.iter().any(|(a, _)| *a == alg) {
                rules.push((alg, validation(alg, s)));
            }
        }
        Ok(Verifier {
            required: s.required,
            keys,
            rules,
            max_token_bytes: s.max_token_bytes,
        })
    }

    /// Whether any key is configured.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// A `hello`'s credential: its verified subject, `None` for an anonymous
    /// `hello` that is allowed, or why it is refused.
    pub fn check(&self, credential: Option<&str>) -> Result<Option<String>, Refusal> {
        match credential {
            None if self.required => Err(Refusal::Required),
            None => Ok(None),
            Some(token) => self.verify(token).map(Some),
        }
    }

    /// The subject of `token`, if it verifies.
    pub fn verify(&self, token: &str) -> Result<String, Refusal> {
        if token.len() > self.max_token_bytes {
            return Err(Refusal::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| Refusal::of(e.kind()))?;
        let Some((_, rules)) = self.rules.iter().find(|(a, _)| *a == header.alg) else {
            return Err(Refusal::Signature);
        };
        for (_, key) in self.keys.iter().filter(|(a, _)| *a == header.alg) {
            match jsonwebtoken::decode::<Claims>(token, key, rules) {
                Ok(data) if data.claims.sub.is_empty() => return Err(Refusal::Malformed),
                Ok(data) => return Ok(data.claims.sub),
                // Another key may be the one (rotation).
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => return Err(Refusal::of(e.kind())),
            }
        }
        Err(Refusal::Signature)
    }
}

/// The claim rules for tokens of `alg`.
fn validation(alg: Algorithm, s: &AuthSettings) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = s.leeway_s;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    match &s.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        // No audience configured: a token's `aud` is not this node's business.
        None => v.validate_aud = false,
    }
    if let Some(iss) = &s.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

/// The public keys of a PEM text, each with its algorithm: RSA keys
/// (`PUBLIC KEY` or `RSA PUBLIC KEY`) verify RS256, P-256 keys ES256.
fn public_keys(pem: &[u8]) -> Result<Vec<(Algorithm, DecodingKey)>, KeyError> {
    let text = String::from_utf8_lossy(pem);
    let mut keys = Vec::new();
    let mut rest: &str = &text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let label_end = block["-----BEGIN ".len()..]
            .find("-----")
            .map(|i| i + "-----BEGIN ".len());
        let label = label_end
            .map(|e| block["-----BEGIN ".len()..e].to_owned())
            .unwrap_or_default();
        let index = keys.len() + 1;
        let bad = |why| KeyError::BadKey {
            index,
            label: label.clone(),
            why,
        };
        let end_marker = format!("-----END {label}-----");
        let Some(end) = block.find(&end_marker) else {
            return Err(bad("no matching END line"));
        };
        let one = &block[..end + end_marker.len()];
        rest = &block[end + end_marker.len()..];
        let key = match label.as_str() {
            "RSA PUBLIC KEY" => DecodingKey::from_rsa_pem(one.as_bytes())
                .map(|k| (Algorithm::RS256, k))
                .map_err(|_| bad("not a readable RSA public key"))?,
            "PUBLIC KEY" => match DecodingKey::from_rsa_pem(one.as_bytes()) {
                Ok(k) => (Algorithm::RS256, k),
                Err(_) => {
                    let k = DecodingKey::from_ec_pem(one.as_bytes())
                        .map_err(|_| bad("neither an RSA nor an EC public key"))?;
                    // The uncompressed point of a P-256 key: 0x04, x, y.
                    if k.try_get_as_bytes().map(<[u8]>::len) != Ok(65) {
                        return Err(bad("an EC key on a curve other than P-256 (ES256)"));
                    }
                    (Algorithm::ES256, k)
                }
            },
            _ => return Err(bad("not a public key (PUBLIC KEY or RSA PUBLIC KEY)")),
        };
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(KeyError::NoPem);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::{json, Value};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn settings() -> AuthSettings {
        AuthSettings {
            hs256_secret: Some(SECRET.to_vec()),
            leeway_s: 30,
            max_token_bytes: 8192,
            ..AuthSettings::default()
        }
    }

    fn hs(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap()
    }

    fn verifier(s: AuthSettings) -> Verifier {
        Verifier::new(&s).unwrap()
    }

    #[test]
    fn a_valid_hs256_token_gives_its_subject() {
        let v = verifier(settings());
        let t = hs(json!({"sub": "alice", "exp": now() + 60}));
        assert_eq!(v.check(Some(&t)), Ok(Some("alice".into())));
        assert_eq!(v.check(None), Ok(None), "anonymous is allowed by default");
    }

    #[test]
    fn expiry_is_always_checked_with_the_leeway() {
        let v = verifier(settings());
        let expired = hs(json!({"sub": "a", "exp": now() - 120}));
        assert_eq!(v.verify(&expired), Err(Refusal::Expired));
        let within_leeway = hs(json!({"sub": "a", "exp": now() - 10}));
        assert_eq!(v.verify(&within_leeway), Ok("a".into()));
        let no_exp = hs(json!({"sub": "a"}));
        assert_eq!(v.verify(&no_exp), Err(Refusal::Malformed));
        // A string `exp` is not an absent one (GHSA-h395-gr6q-cpjc).
        let string_exp = hs(json!({"sub": "a", "exp": "never"}));
        assert_eq!(v.verify(&string_exp), Err(Refusal::Malformed));
    }

    #[test]
    fn nbf_is_checked_when_present() {
        let v = verifier(settings());
        let early = hs(json!({"sub": "a", "exp": now() + 600, "nbf": now() + 300}));
        assert_eq!(v.verify(&early), Err(Refusal::Expired));
        let ok = hs(json!({"sub": "a", "exp": now() + 600, "nbf": now() - 1}));
        assert_eq!(v.verify(&ok), Ok("a".into()));
        let string_nbf = hs(json!({"sub": "a", "exp": now() + 600, "nbf": "99999999999"}));
        assert_eq!(v.verify(&string_nbf), Err(Refusal::Malformed));
    }

    #[test]
    fn a_wrong_signature_or_algorithm_is_refused() {
        let v = verifier(settings());
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "a", "exp": now() + 60}),
            &EncodingKey::from_secret(b"another-secret-another-secret-xx").unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&other), Err(Refusal::Signature));
        // HS384 with the same secret: no key is configured for it.
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "a", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&hs384), Err(Refusal::Signature));
        // alg "none", hand-made: the library does not even read it.
        let b64 = |v: Value| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(json!({"sub": "a", "exp": now() + 60}))
        );
        assert!(v.verify(&none).is_err());
        // A credential but no key at all.
        let keyless = verifier(AuthSettings {
            hs256_secret: None,
            ..settings()
        });
        let t = hs(json!({"sub": "a", "exp": now() + 60}));
        assert_eq!(keyless.verify(&t), Err(Refusal::Signature));
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let v = verifier(AuthSettings {
            audience: Some("berth".into()),
            issuer: Some("https://id.example".into()),
            ..settings()
        });
        let good =
            json!({"sub": "a", "exp": now() + 60, "aud": "berth", "iss": "https://id.example"});
        assert_eq!(v.verify(&hs(good.clone())), Ok("a".into()));
        let mut c = good.clone();
        c["aud"] = json!("other");
        assert_eq!(v.verify(&hs(c)), Err(Refusal::Audience));
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(v.verify(&hs(c)), Err(Refusal::Audience));
        let mut c = good.clone();
        c["iss"] = json!("https://evil.example");
        assert_eq!(v.verify(&hs(c)), Err(Refusal::Issuer));
        let mut c = good;
        c.as_object_mut().unwrap().remove("iss");
        assert_eq!(v.verify(&hs(c)), Err(Refusal::Issuer));
        // Not configured: a token's `aud` is ignored.
        let plain = verifier(settings());
        let t = hs(json!({"sub": "a", "exp": now() + 60, "aud": "whoever"}));
        assert_eq!(plain.verify(&t), Ok("a".into()));
    }

    #[test]
    fn malformed_credentials_and_the_size_bound() {
        let v = verifier(AuthSettings {
            max_token_bytes: 200,
            ..settings()
        });
        for junk in ["", "x", "a.b.c", "not a jwt at all", "...."] {
            assert_eq!(v.verify(junk), Err(Refusal::Malformed), "{junk:?}");
        }
        let no_sub = hs(json!({"exp": now() + 60}));
        assert_eq!(v.verify(&no_sub), Err(Refusal::Malformed));
        let empty_sub = hs(json!({"sub": "", "exp": now() + 60}));
        assert_eq!(v.verify(&empty_sub), Err(Refusal::Malformed));
        let number_sub = hs(json!({"sub": 7, "exp": now() + 60}));
        assert_eq!(v.verify(&number_sub), Err(Refusal::Malformed));
        let long = hs(json!({"sub": "a".repeat(300), "exp": now() + 60}));
        assert_eq!(v.verify(&long), Err(Refusal::Malformed), "over the bound");
    }

    #[test]
    fn required_refuses_anonymous() {
        let v = verifier(AuthSettings {
            required: true,
            ..settings()
        });
        assert_eq!(v.check(None), Err(Refusal::Required));
    }

    #[test]
    fn short_secrets_and_bad_pem_are_start_up_errors() {
        let short = Verifier::new(&AuthSettings {
            hs256_secret: Some(b"short".to_vec()),
            ..settings()
        });
        assert_eq!(short.unwrap_err(), KeyError::ShortSecret(5));
        let none = Verifier::new(&AuthSettings {
            public_keys_pem: Some(b"hello".to_vec()),
            ..settings()
        });
        assert_eq!(none.unwrap_err(), KeyError::NoPem);
        let junk = Verifier::new(&AuthSettings {
            public_keys_pem: Some(
                b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec(),
            ),
            ..settings()
        });
        assert!(
            matches!(junk, Err(KeyError::BadKey { index: 1, .. })),
            "{junk:?}"
        );
    }

    /// Keys made by `openssl` when it is installed (scripts/install-deps.sh
    /// installs it); the integration tests (tests/it/auth.rs) need it too.
    fn openssl(args: &[&str], dir: &std::path::Path) -> bool {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn rs256_and_es256_keys_from_one_pem_file_and_rotation() {
        let dir = std::env::temp_dir().join(format!("berth-auth-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "rsa.pem",
            ],
            &dir,
        ) && openssl(
            &["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"],
            &dir,
        ) && openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ec.pem",
            ],
            &dir,
        ) && openssl(
            &["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub"],
            &dir,
        ) && openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-out",
                "p384.pem",
            ],
            &dir,
        ) && openssl(
            &["pkey", "-in", "p384.pem", "-pubout", "-out", "p384.pub"],
            &dir,
        );
        assert!(
            made,
            "openssl is needed: scripts/install-deps.sh installs it"
        );
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let mut pem = read("rsa.pub");
        pem.extend(read("ec.pub"));
        let v = verifier(AuthSettings {
            hs256_secret: None,
            public_keys_pem: Some(pem),
            ..settings()
        });
        let claims = json!({"sub": "bob", "exp": now() + 60});
        let rs = encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(&read("rsa.pem")).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&rs), Ok("bob".into()));
        let es = encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(&read("ec.pem")).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&es), Ok("bob".into()));
        // An HS256 token signed with the RSA public key as its secret (the
        // classic confusion): no HS256 key is configured, refused.
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&read("rsa.pub")).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&confused), Err(Refusal::Signature));
        // Rotation: a second RSA key after the first; tokens of either verify.
        assert!(
            openssl(
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                    "rsa2.pem"
                ],
                &dir
            ) && openssl(
                &["pkey", "-in", "rsa2.pem", "-pubout", "-out", "rsa2.pub"],
                &dir
            )
        );
        let mut both = read("rsa.pub");
        both.extend(read("rsa2.pub"));
        let v2 = verifier(AuthSettings {
            hs256_secret: None,
            public_keys_pem: Some(both),
            ..settings()
        });
        let rs2 = encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(&read("rsa2.pem")).unwrap(),
        )
        .unwrap();
        assert_eq!(v2.verify(&rs), Ok("bob".into()));
        assert_eq!(v2.verify(&rs2), Ok("bob".into()));
        assert_eq!(
            v.verify(&rs2),
            Err(Refusal::Signature),
            "not configured in v"
        );
        // P-384 is not ES256: a start-up error.
        let p384 = Verifier::new(&AuthSettings {
            public_keys_pem: Some(read("p384.pub")),
            ..settings()
        });
        assert!(
            matches!(p384, Err(KeyError::BadKey { index: 1, .. })),
            "{p384:?}"
        );
        // A private key in the public keys file: a start-up error.
        let private = Verifier::new(&AuthSettings {
            public_keys_pem: Some(read("ec.pem")),
            ..settings()
        });
        assert!(
            matches!(private, Err(KeyError::BadKey { .. })),
            "{private:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
