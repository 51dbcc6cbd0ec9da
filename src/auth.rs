//! Who may connect and what they may do (docs/PROTOCOL.md §3.2): JWT validation, the identity a
//! token grants, room and publish globs, and `confab token`'s signing. No actix here: the upgrade
//! handler asks, this module answers.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

use crate::domain::{RoomName, UserId};
use crate::settings::AuthSettings;

/// Clock skew forgiven on `exp`, also when a session is closed at its token's expiry.
pub const LEEWAY: Duration = Duration::from_secs(5);

/// Longest display name a token may carry, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// How tokens are checked; built once at start-up from `auth.*`.
pub struct Verifier {
    /// Each algorithm the configured keys allow, with its key and the checks a token of it
    /// must pass (built once, not per connection). A token's `alg` must be one of these:
    /// `none` never is, and an HS256 token is never checked against a public key.
    keys: Vec<(Algorithm, DecodingKey, Validation)>,
}

/// Why a token was refused; every one is a 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "a token is required: ?token=, Authorization: Bearer, or the `token.<jwt>` subprotocol"
    )]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token's algorithm is not one this server accepts")]
    Algorithm,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token is not for this audience")]
    Audience,
    #[error("the token is not from the expected issuer")]
    Issuer,
    #[error("the token is not valid yet (`nbf` is in the future)")]
    NotYetValid,
    #[error("the token's `{0}` is null: leave the claim out to allow every room, or list globs")]
    NullClaim(&'static str),
    #[error("the token's `sub` is not a valid user name: {0}")]
    Subject(String),
    #[error(
        "the token's `name` must be 1 to {MAX_NAME_CHARS} characters with no control characters"
    )]
    Name,
    #[error("the token is malformed: {0}")]
    Malformed(String),
}

/// Why a public key file is unusable; start-up stops naming `auth.jwt_public_key_file`.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not a PEM RSA or EC (P-256) public key")]
    Format(String),
}

/// A public key file's key and the algorithm it verifies.
pub fn read_public_key(path: &str) -> Result<(Algorithm, DecodingKey), KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((Algorithm::ES256, key));
    }
    Err(KeyError::Format(path.to_owned()))
}

/// The claims confab reads (docs/PROTOCOL.md §3.2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// A claim that may be absent, `null`, or a value: `Option<Option<T>>` with serde's default would
/// read `null` as absent, and an absent `rooms` means every room (docs/PROTOCOL.md §3.2), so a
/// `null` would silently widen access.
#[derive(Debug, Clone, Default)]
enum Claim<T> {
    #[default]
    Absent,
    Null,
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Claim<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only called when the field is present; `#[serde(default)]` gives `Absent`.
        Ok(match Option::<T>::deserialize(d)? {
            None => Self::Null,
            Some(v) => Self::Value(v),
        })
    }
}

impl<T> Claim<T> {
    /// The value, `None` when absent; a `null` is refused, naming the claim.
    fn present(self, name: &'static str) -> Result<Option<T>, AuthError> {
        match self {
            Self::Absent => Ok(None),
            Self::Null => Err(AuthError::NullClaim(name)),
            Self::Value(v) => Ok(Some(v)),
        }
    }
}

/// The claims a presented token is read with: [`Claims`], with `rooms` and `publish` able to
/// tell `null` from absent. `exp`, `nbf`, `aud` and `iss` are checked by jsonwebtoken.
#[derive(Debug, Deserialize)]
struct Received {
    sub: String,
    exp: u64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    rooms: Claim<Vec<String>>,
    #[serde(default)]
    publish: Claim<Vec<String>>,
    /// Read only to refuse an `nbf` that is not a number: jsonwebtoken skips the check for
    /// one it cannot parse, which would make "not before tomorrow" valid today.
    #[serde(default, rename = "nbf")]
    _nbf: Option<f64>,
}

/// Who a session is and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserId,
    /// Display name shown with the user's messages.
    pub name: Option<Arc<str>>,
    /// The token's `rooms` globs; `None` allows every room.
    rooms: Option<Vec<WildMatch>>,
    /// The token's `publish` globs; `None` allows wherever the user may join.
    publish: Option<Vec<WildMatch>>,
    /// When the token stops being valid; `None` for anonymous sessions.
    pub expires: Option<SystemTime>,
}

impl Identity {
    /// Anonymous mode: anyone, any room, no expiry.
    pub fn anonymous(user: UserId) -> Self {
        Self {
            user,
            name: None,
            rooms: None,
            publish: None,
            expires: None,
        }
    }

    pub fn may_join(&self, room: &RoomName) -> bool {
        self.rooms
            .as_ref()
            .map_or(true, |globs| any_match(globs, room))
    }

    /// `publish` absent means wherever the user may join.
    pub fn may_publish(&self, room: &RoomName) -> bool {
        self.may_join(room)
            && self
                .publish
                .as_ref()
                .map_or(true, |globs| any_match(globs, room))
    }
}

fn any_match(globs: &[WildMatch], room: &RoomName) -> bool {
    globs.iter().any(|g| g.matches(room.as_str()))
}

/// A claim's globs, compiled once when the token is verified rather than at every check.
/// `*` matches any run of characters (also none), `?` exactly one; everything else itself.
fn compile(globs: Option<Vec<String>>) -> Option<Vec<WildMatch>> {
    globs.map(|globs| globs.iter().map(|g| WildMatch::new(g)).collect())
}

/// What a token signed with `alg` must carry: `exp` and `sub`, and the configured audience
/// and issuer. jsonwebtoken checks `aud` and `iss` only when the token has them unless they
/// are required, so a token minted for another service with the same key and without them
/// would pass: they are required whenever they are configured. `nbf`, when present, is
/// checked with the same leeway as `exp`.
fn validation(alg: Algorithm, settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY.as_secs();
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    match settings.audience.as_str() {
        "" => validation.validate_aud = false,
        aud => {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
    }
    if !settings.issuer.is_empty() {
        validation.set_issuer(&[&settings.issuer]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// HS256 keys shorter than the hash are weak (RFC 7518 §3.2: at least 256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// The start-up warning for a short `auth.jwt_secret`, if it is one.
pub fn short_secret_warning(settings: &AuthSettings) -> Option<String> {
    let len = settings.jwt_secret.len();
    (len > 0 && len < MIN_SECRET_BYTES).then(|| {
        format!(
            "auth.jwt_secret is {len} bytes: HS256 wants at least {MIN_SECRET_BYTES} random bytes \
             (RFC 7518 §3.2), or a guessed secret lets anyone mint tokens"
        )
    })
}

impl Verifier {
    /// `None` when no key is configured: connections are anonymous.
    pub fn from_settings(settings: &AuthSettings) -> Result<Option<Self>, KeyError> {
        if !settings.enabled() {
            return Ok(None);
        }
        if let Some(warning) = short_secret_warning(settings) {
            log::warn!("{warning}");
        }
        let mut keys = Vec::new();
        if !settings.jwt_secret.is_empty() {
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(settings.jwt_secret.as_bytes()),
            ));
        }
        if !settings.jwt_public_key_file.is_empty() {
            keys.push(read_public_key(&settings.jwt_public_key_file)?);
        }
        let keys = keys
            .into_iter()
            .map(|(alg, key)| (alg, key, validation(alg, settings)))
            .collect();
        Ok(Some(Self { keys }))
    }

    /// The algorithms tokens may use, for logs and docs.
    pub fn algorithms(&self) -> Vec<String> {
        self.keys.iter().map(|(a, _, _)| format!("{a:?}")).collect()
    }

    /// Checks a token and returns the identity it grants.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // `alg: none` and unknown algorithms fail here, as JSON the header type rejects.
            ErrorKind::Json(_) => AuthError::Algorithm,
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let (_, key, validation) = self
            .keys
            .iter()
            .find(|(a, _, _)| *a == header.alg)
            .ok_or(AuthError::Algorithm)?;
        let data = jsonwebtoken::decode::<Received>(token, key, validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::Signature,
            ErrorKind::InvalidAudience => AuthError::Audience,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            // Required because configured (see `validation`), and missing.
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::Audience,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::Issuer,
            ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let claims = data.claims;
        let user = UserId::parse(&claims.sub).map_err(|e| AuthError::Subject(e.to_string()))?;
        let name = match claims.name {
            None => None,
            Some(n) => {
                let chars = n.chars().count();
                if chars == 0 || chars > MAX_NAME_CHARS || n.chars().any(char::is_control) {
                    return Err(AuthError::Name);
                }
                Some(Arc::from(n))
            }
        };
        Ok(Identity {
            user,
            name,
            rooms: compile(claims.rooms.present("rooms")?),
            publish: compile(claims.publish.present("publish")?),
            // A time past what the clock can hold never comes: no expiry.
            expires: UNIX_EPOCH.checked_add(Duration::from_secs(claims.exp)),
        })
    }
}

/// What `confab token` puts in a token.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    pub sub: String,
    pub name: Option<String>,
    pub rooms: Option<Vec<String>>,
    pub publish: Option<Vec<String>>,
    pub ttl: Duration,
}

/// Signs an HS256 token with `auth.jwt_secret`, with `aud`/`iss` when configured, so the
/// server that printed it accepts it.
pub fn sign_hs256(settings: &AuthSettings, req: &TokenRequest) -> Result<String, String> {
    if settings.jwt_secret.is_empty() {
        return Err("auth.jwt_secret is not set (in the config file, or as \
                    CONFAB_AUTH__JWT_SECRET): `confab token` signs with it"
            .into());
    }
    UserId::parse(&req.sub).map_err(|e| format!("--sub {e}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let set = |s: &String| (!s.is_empty()).then(|| s.clone());
    let claims = Claims {
        sub: req.sub.clone(),
        exp: (now + req.ttl).as_secs(),
        name: req.name.clone(),
        rooms: req.rooms.clone(),
        publish: req.publish.clone(),
        aud: set(&settings.audience),
        iss: set(&settings.issuer),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(settings.jwt_secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(secret: &str) -> AuthSettings {
        AuthSettings {
            jwt_secret: secret.into(),
            ..Default::default()
        }
    }

    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }

    fn token(settings: &AuthSettings, sub: &str, rooms: Option<&[&str]>) -> String {
        let own = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect();
        sign_hs256(
            settings,
            &TokenRequest {
                sub: sub.into(),
                rooms: rooms.map(own),
                publish: Some(vec!["team-*".into()]),
                ttl: Duration::from_secs(60),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn glob_match(pattern: &str, name: &str) -> bool {
        WildMatch::new(pattern).matches(name)
    }

    #[test]
    fn globs_match_like_shell_patterns() {
        assert!(glob_match("team-*", "team-a"));
        assert!(glob_match("team-*", "team-"));
        assert!(!glob_match("team-*", "teams"));
        assert!(glob_match("lobby", "lobby"));
        assert!(!glob_match("lobby", "lobby2"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("r?om", "room"));
        assert!(!glob_match("r?om", "rom"));
        assert!(glob_match("*-ops-*", "eu-ops-1"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        let long = "a".repeat(64);
        assert!(
            !glob_match("*a*a*a*a*a*a*a*b", &long),
            "no blow-up, no match"
        );
    }

    #[test]
    fn a_signed_token_grants_its_claims() {
        let s = settings("s3cret");
        let verifier = Verifier::from_settings(&s).unwrap().unwrap();
        let id = verifier
            .verify(&token(&s, "alice", Some(&["team-*", "lobby"])))
            .unwrap();
        assert_eq!(id.user.as_str(), "alice");
        assert!(id.may_join(&room("team-x")) && id.may_join(&room("lobby")));
        assert!(!id.may_join(&room("secret")));
        assert!(id.may_publish(&room("team-x")));
        assert!(!id.may_publish(&room("lobby")), "publish narrows join");
        assert!(id.expires.is_some());
    }

    #[test]
    fn wrong_secret_bad_subject_and_no_key_are_refused() {
        let s = settings("s3cret");
        let verifier = Verifier::from_settings(&s).unwrap().unwrap();
        let other = token(&settings("other"), "alice", None);
        assert_eq!(verifier.verify(&other).unwrap_err(), AuthError::Signature);
        let claims = Claims {
            sub: "al ice".into(),
            exp: 4_000_000_000,
            name: None,
            rooms: None,
            publish: None,
            aud: None,
            iss: None,
        };
        let bad = jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(matches!(
            verifier.verify(&bad).unwrap_err(),
            AuthError::Subject(_)
        ));
        assert!(Verifier::from_settings(&settings("")).unwrap().is_none());
    }

    #[test]
    fn null_rooms_or_publish_are_refused_and_absent_ones_allow_every_room() {
        let s = settings("s3cret-s3cret-s3cret-s3cret-s3cret");
        let verifier = Verifier::from_settings(&s).unwrap().unwrap();
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(s.jwt_secret.as_bytes()),
            )
            .unwrap()
        };
        let far = 4_000_000_000u64;
        for claim in ["rooms", "publish"] {
            let mut c = serde_json::json!({"sub": "alice", "exp": far});
            c[claim] = serde_json::Value::Null;
            assert_eq!(
                verifier.verify(&sign(c)).unwrap_err(),
                AuthError::NullClaim(claim)
            );
        }
        let id = verifier
            .verify(&sign(serde_json::json!({"sub": "alice", "exp": far})))
            .unwrap();
        assert!(id.may_join(&room("any")) && id.may_publish(&room("any")));
        let none = sign(serde_json::json!({"sub": "alice", "exp": far, "rooms": []}));
        assert!(!verifier.verify(&none).unwrap().may_join(&room("any")));
        let odd = sign(serde_json::json!({"sub": "alice", "exp": far, "nbf": "tomorrow"}));
        assert!(matches!(
            verifier.verify(&odd).unwrap_err(),
            AuthError::Malformed(_)
        ));
    }

    #[test]
    fn a_secret_under_32_bytes_is_warned_about() {
        assert!(short_secret_warning(&settings("")).is_none(), "no secret");
        let warning = short_secret_warning(&settings("short")).unwrap();
        assert!(warning.contains("auth.jwt_secret is 5 bytes"), "{warning}");
        assert!(short_secret_warning(&settings(&"x".repeat(32))).is_none());
    }

    #[test]
    fn alg_none_is_refused() {
        let s = settings("s3cret");
        let verifier = Verifier::from_settings(&s).unwrap().unwrap();
        let b64 = |j: &str| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(j)
        };
        let far = 4_000_000_000u64;
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&format!(r#"{{"sub":"alice","exp":{far}}}"#))
        );
        assert_eq!(verifier.verify(&none).unwrap_err(), AuthError::Algorithm);
    }
}
