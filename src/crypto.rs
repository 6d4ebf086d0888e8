//! Encryption at rest, secret hashing and event signatures.
//!
//! Every encrypted value is sealed with AES-256-GCM under the current master key. The sealed
//! bytes carry a format version and the key's id, so that values sealed under an older key still
//! open after a rotation (`tokenwarden keys rotate` re-seals them under the new key). The
//! associated data binds a ciphertext to its table, row and field: a ciphertext copied onto
//! another instance, or from the refresh-token column into the access-token column, does not
//! open.
//!
//! Platform secrets (organization, user and Element tokens) are 256-bit random values; only their
//! SHA-256 is stored. A slow password hash buys nothing for values with 256 bits of entropy.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

const FORMAT_VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the master key is not valid: {0}")]
    BadKey(String),
    #[error("a stored value was sealed under key {0}, which this process does not have")]
    UnknownKey(String),
    #[error("a stored value does not open: it was altered, or belongs to another row or field")]
    Tampered,
    #[error("the stored value is not in a known format")]
    Format,
    #[error("could not read or write the key file {path}: {message}")]
    KeyFile { path: String, message: String },
    /// No key file where one was looked for, and none was to be made.
    #[error("the key file {path} is missing")]
    KeyFileMissing { path: String },
}

/// A 256-bit master key and its id (the first bytes of a hash of the key, never the key itself).
#[derive(Clone)]
pub struct MasterKey {
    id: [u8; KEY_ID_LEN],
    cipher: Aes256Gcm,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id_hex())
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != 32 {
            return Err(CryptoError::BadKey(format!(
                "it must be 32 bytes, base64-encoded; this one is {} bytes",
                bytes.len()
            )));
        }
        let cipher = Aes256Gcm::new_from_slice(bytes)
            .map_err(|_| CryptoError::BadKey("not usable as an AES-256 key".into()))?;
        let digest = Sha256::new()
            .chain_update(b"tokenwarden key id\0")
            .chain_update(bytes)
            .finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Ok(MasterKey { id, cipher })
    }

    /// Parses the base64 form used by `TOKENWARDEN_MASTER_KEY` and key files.
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        // Either alphabet, padded or not (`openssl rand -base64 32` pads; other tools do not).
        use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
        let any_padding =
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
        let bytes = GeneralPurpose::new(&base64::alphabet::STANDARD, any_padding)
            .decode(text.trim())
            .or_else(|_| {
                GeneralPurpose::new(&base64::alphabet::URL_SAFE, any_padding).decode(text.trim())
            })
            .map_err(|_| {
                CryptoError::BadKey(
                    "it is not base64; make one with `openssl rand -base64 32`".into(),
                )
            })?;
        Self::from_bytes(&bytes)
    }

    /// A new random key, returned with its base64 form for storing.
    pub fn generate() -> (Self, Secret) {
        let bytes = random_bytes::<32>();
        let text = Secret::new(STANDARD.encode(bytes));
        (
            Self::from_bytes(&bytes).expect("32 random bytes make a key"),
            text,
        )
    }

    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

/// Where a sealed value lives; bound into the associated data.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub table: &'a str,
    pub row: i64,
    pub field: &'a str,
}

impl Binding<'_> {
    fn associated_data(&self) -> Vec<u8> {
        format!("tokenwarden/v1/{}/{}/{}", self.table, self.row, self.field).into_bytes()
    }
}

/// The current key (used to seal) and every older key still able to open.
#[derive(Clone, Debug)]
pub struct Keyring {
    current: MasterKey,
    by_id: HashMap<[u8; KEY_ID_LEN], MasterKey>,
    /// When a value sealed under a key this keyring lacks was last met, and that key's id: a
    /// replica left out of a key rotation (or started with the new key alone too early)
    /// answers such instances 409 `unreadable`, and its `/healthz` says so.
    last_unknown_key: std::sync::Arc<std::sync::Mutex<Option<(i64, String)>>>,
}

impl Keyring {
    pub fn new(current: MasterKey, previous: Vec<MasterKey>) -> Self {
        let mut by_id = HashMap::new();
        for key in previous.into_iter().chain(std::iter::once(current.clone())) {
            by_id.insert(key.id, key);
        }
        Keyring {
            current,
            by_id,
            last_unknown_key: std::sync::Arc::default(),
        }
    }

    pub fn current_key_id(&self) -> String {
        self.current.id_hex()
    }

    pub fn seal(&self, plaintext: &[u8], binding: Binding<'_>) -> Vec<u8> {
        let nonce_bytes = random_bytes::<NONCE_LEN>();
        let nonce = Nonce::from(nonce_bytes);
        let aad = binding.associated_data();
        let ciphertext = self
            .current
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        let mut sealed = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        sealed.push(FORMAT_VERSION);
        sealed.extend_from_slice(&self.current.id);
        sealed.extend_from_slice(&nonce_bytes);
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// The id of a key this keyring lacks whose values it was asked to open within
    /// `within_ms`.
    pub fn recent_unknown_key(&self, within_ms: i64) -> Option<String> {
        let now = crate::app::system_now_ms();
        self.last_unknown_key
            .lock()
            .ok()?
            .as_ref()
            .filter(|(at, _)| now - at <= within_ms)
            .map(|(_, id)| id.clone())
    }

    pub fn open(&self, sealed: &[u8], binding: Binding<'_>) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < HEADER_LEN + 16 || sealed[0] != FORMAT_VERSION {
            return Err(CryptoError::Format);
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&sealed[1..1 + KEY_ID_LEN]);
        let key = self.by_id.get(&id).ok_or_else(|| {
            let id = hex(&id);
            if let Ok(mut last) = self.last_unknown_key.lock() {
                *last = Some((crate::app::system_now_ms(), id.clone()));
            }
            CryptoError::UnknownKey(id)
        })?;
        let mut nonce_bytes = [0u8; NONCE_LEN];
        nonce_bytes.copy_from_slice(&sealed[1 + KEY_ID_LEN..HEADER_LEN]);
        let aad = binding.associated_data();
        key.cipher
            .decrypt(
                &Nonce::from(nonce_bytes),
                Payload {
                    msg: &sealed[HEADER_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Tampered)
    }

    pub fn seal_secret(&self, secret: &Secret, binding: Binding<'_>) -> Vec<u8> {
        self.seal(secret.expose().as_bytes(), binding)
    }

    pub fn open_secret(&self, sealed: &[u8], binding: Binding<'_>) -> Result<Secret, CryptoError> {
        let bytes = self.open(sealed, binding)?;
        String::from_utf8(bytes)
            .map(Secret::new)
            .map_err(|_| CryptoError::Format)
    }

    /// The id (hex) of the key a sealed value names, when this keyring has no such key; `None`
    /// when it has it, or when the value is not in a known format.
    pub fn missing_key_of(&self, sealed: &[u8]) -> Option<String> {
        if sealed.len() < HEADER_LEN || sealed[0] != FORMAT_VERSION {
            return None;
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&sealed[1..1 + KEY_ID_LEN]);
        (!self.by_id.contains_key(&id)).then(|| hex(&id))
    }

    /// Whether a sealed value is under the current key (key rotation skips those).
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        sealed.len() > KEY_ID_LEN && sealed[1..1 + KEY_ID_LEN] == self.current.id
    }
}

/// Loads the keyring: `TOKENWARDEN_MASTER_KEY` when given; with SQLite and no key, a key file
/// beside the database (created with mode 0600); with PostgreSQL and no key, an error that says
/// how to make one. `previous` are older keys still accepted for opening.
pub fn load_keyring(
    master_key: Option<&str>,
    previous: Option<&str>,
    database_url: &str,
) -> Result<Keyring, CryptoError> {
    load_keyring_making(master_key, previous, database_url, true)
}

/// [`load_keyring`], where a missing key file is made only when `make_key_file` (else
/// [`CryptoError::KeyFileMissing`]): a database that holds sealed secrets was sealed with
/// another key, and a new file would only stand where the lost one belongs.
pub fn load_keyring_making(
    master_key: Option<&str>,
    previous: Option<&str>,
    database_url: &str,
    make_key_file: bool,
) -> Result<Keyring, CryptoError> {
    // A key that does not parse is named by where it came from.
    let named = |source: String| {
        move |error: CryptoError| match error {
            CryptoError::BadKey(why) => CryptoError::BadKey(format!("{source}: {why}")),
            other => other,
        }
    };
    let previous_keys = previous
        .unwrap_or("")
        .split(',')
        .filter(|part| !part.trim().is_empty())
        .enumerate()
        .map(|(index, text)| {
            MasterKey::from_base64(text).map_err(named(format!(
                "key {} of TOKENWARDEN_PREVIOUS_MASTER_KEYS",
                index + 1
            )))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(text) = master_key.filter(|text| !text.trim().is_empty()) {
        let key = MasterKey::from_base64(text)
            .map_err(named("--master-key / TOKENWARDEN_MASTER_KEY".to_string()))?;
        return Ok(Keyring::new(key, previous_keys));
    }
    if sqlite_path(database_url).is_none() {
        return Err(CryptoError::BadKey(
            "TOKENWARDEN_MASTER_KEY is not set. With PostgreSQL every replica must share one key: \
             make one with `openssl rand -base64 32` (or `head -c32 /dev/urandom | base64`) and \
             set TOKENWARDEN_MASTER_KEY to it on every replica"
                .into(),
        ));
    }
    // An in-memory database lives as long as the process: so does a key of its own (a file
    // named `:memory:.key` appeared in the current directory).
    let Some(key_path) = key_file_of(database_url) else {
        return Ok(Keyring::new(MasterKey::generate().0, previous_keys));
    };
    let key = load_or_create_key_file(&key_path, make_key_file)?;
    Ok(Keyring::new(key, previous_keys))
}

/// The key file of a SQLite database: beside the file as SQLite opens it, or where earlier
/// releases put it (the URL's path as written) when that is where it is. `None` for
/// PostgreSQL and in memory.
pub fn key_file_of(database_url: &str) -> Option<std::path::PathBuf> {
    let database_path = sqlite_path(database_url)?;
    let file = crate::store::sqlite_file(database_url)?;
    let key_path = format!("{file}.key");
    let written = format!("{database_path}.key");
    if written != key_path && !Path::new(&key_path).exists() && Path::new(&written).exists() {
        return Some(written.into());
    }
    Some(key_path.into())
}

/// Gives the database at `to` the key file `from` (a copy of a SQLite database: its sealed
/// values open with the source's key). A key file already at `to` must hold the same key.
/// Returns whether a file was written.
pub fn copy_key_file(from: &Path, to: &Path) -> Result<bool, CryptoError> {
    fn key_file_error(path: &Path) -> impl Fn(std::io::Error) -> CryptoError + '_ {
        move |error| CryptoError::KeyFile {
            path: path.display().to_string(),
            message: error.to_string(),
        }
    }
    let text = Secret::new(std::fs::read_to_string(from).map_err(key_file_error(from))?);
    fn in_the_file(path: &Path) -> impl Fn(CryptoError) -> CryptoError + '_ {
        move |error| match error {
            CryptoError::BadKey(why) => {
                CryptoError::BadKey(format!("the key file {}: {why}", path.display()))
            }
            other => other,
        }
    }
    let key = MasterKey::from_base64(text.expose()).map_err(in_the_file(from))?;
    match std::fs::read_to_string(to) {
        Ok(there) => {
            let held = MasterKey::from_base64(&there).map_err(in_the_file(to))?;
            if held.id != key.id {
                return Err(CryptoError::BadKey(format!(
                    "the key file {} holds another key than {}: move it away (the copy opens with the source's key only)",
                    to.display(),
                    from.display()
                )));
            }
            Ok(false)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            write_private_file(to, text.expose().as_bytes()).map_err(key_file_error(to))?;
            Ok(true)
        }
        Err(error) => Err(key_file_error(to)(error)),
    }
}

/// The file path of a `sqlite://` URL, without its query.
pub fn sqlite_path(database_url: &str) -> Option<String> {
    let rest = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    Some(path.to_string())
}

fn load_or_create_key_file(path: &Path, create: bool) -> Result<MasterKey, CryptoError> {
    let key_file_error = |error: std::io::Error| CryptoError::KeyFile {
        path: path.display().to_string(),
        message: error.to_string(),
    };
    let in_the_file = |error: CryptoError| match error {
        CryptoError::BadKey(why) => {
            CryptoError::BadKey(format!("the key file {}: {why}", path.display()))
        }
        other => other,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            warn_if_shared(path);
            MasterKey::from_base64(&text).map_err(in_the_file)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && !create => {
            Err(CryptoError::KeyFileMissing {
                path: path.display().to_string(),
            })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let (key, text) = MasterKey::generate();
            match write_private_file(path, text.expose().as_bytes()) {
                Ok(()) => {}
                // Another process (`serve` and `orgs create` started together) made it first:
                // its key, whole (the file appears only once written), is the one.
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path).map_err(key_file_error)?;
                    return MasterKey::from_base64(&text).map_err(in_the_file);
                }
                Err(error) => return Err(key_file_error(error)),
            }
            tracing::warn!(
                key_file = %path.display(),
                key_id = %key.id_hex(),
                "TOKENWARDEN_MASTER_KEY is not set: created a new master key file (mode 0600) \
                 beside the database. Back it up: without it the stored tokens cannot be read"
            );
            Ok(key)
        }
        Err(error) => Err(key_file_error(error)),
    }
}

/// Warns when a key file can be read by other users than its owner (copied or restored with
/// another mode): the key opens every token.
fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = std::fs::metadata(path) {
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    key_file = %path.display(),
                    "the master key file can be read by other users (mode {mode:o}): `chmod 600` it; the key opens every stored token"
                );
            }
        }
    }
}

/// Creates `path` with `contents`, readable by its owner only, all at once: written to a file
/// of its own first and then linked into place, so that no reader ever sees it half written;
/// `AlreadyExists` when `path` exists (never replaced).
fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.tmp", hex(&random_bytes::<6>())));
    let staged = std::path::PathBuf::from(name);
    let written = (|| {
        let mut file = options.open(&staged)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::hard_link(&staged, path)
    })();
    let _ = std::fs::remove_file(&staged);
    written
}

/// A new 256-bit random secret, URL-safe base64 (organization, user and Element secrets).
pub fn new_platform_secret() -> Secret {
    Secret::new(URL_SAFE_NO_PAD.encode(random_bytes::<32>()))
}

/// The stored form of a platform secret.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::new()
        .chain_update(b"tokenwarden secret\0")
        .chain_update(secret.as_bytes())
        .finalize()
        .to_vec()
}

/// Constant-time comparison of two hashes.
pub fn hashes_equal(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && bool::from(left.ct_eq(right))
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` for `X-Tokenwarden-Signature`.
pub fn sign_event(key: &[u8], unix_seconds: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix_seconds},v1={}", hex(&mac.finalize().into_bytes()))
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// A random id below 2^53 (safe in JavaScript), never below 100000 so it looks like an id.
pub fn new_id() -> i64 {
    let raw = u64::from_le_bytes(random_bytes::<8>()) & ((1u64 << 53) - 1);
    (raw.max(100_000)) as i64
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Bytes first, then one check: pushing `char`s encodes each one (request ids are made per
    // proxied call).
    let text: Vec<u8> = bytes
        .iter()
        .flat_map(|byte| [DIGITS[(byte >> 4) as usize], DIGITS[(byte & 0xf) as usize]])
        .collect();
    String::from_utf8(text).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(row: i64, field: &str) -> Binding<'_> {
        Binding {
            table: "instances",
            row,
            field,
        }
    }

    #[test]
    fn sealed_value_opens_only_at_its_own_row_and_field() {
        let (key, _) = MasterKey::generate();
        let keyring = Keyring::new(key, vec![]);
        let sealed = keyring.seal(b"refresh-token-value", binding(7, "refresh_token"));
        assert!(
            !sealed
                .windows(b"refresh-token-value".len())
                .any(|w| w == b"refresh-token-value")
        );
        assert_eq!(
            keyring.open(&sealed, binding(7, "refresh_token")).unwrap(),
            b"refresh-token-value"
        );
        assert!(matches!(
            keyring.open(&sealed, binding(8, "refresh_token")),
            Err(CryptoError::Tampered)
        ));
        assert!(matches!(
            keyring.open(&sealed, binding(7, "access_token")),
            Err(CryptoError::Tampered)
        ));
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(keyring.open(&altered, binding(7, "refresh_token")).is_err());
    }

    #[test]
    fn old_keys_open_after_rotation_and_unknown_keys_are_named() {
        let (old, _) = MasterKey::generate();
        let (new, _) = MasterKey::generate();
        let before = Keyring::new(old.clone(), vec![]);
        let sealed = before.seal(b"x", binding(1, "f"));
        let after = Keyring::new(new.clone(), vec![old.clone()]);
        assert_eq!(after.open(&sealed, binding(1, "f")).unwrap(), b"x");
        assert!(!after.is_current(&sealed));
        assert!(after.is_current(&after.seal(b"x", binding(1, "f"))));
        let without_old = Keyring::new(new, vec![]);
        match without_old.open(&sealed, binding(1, "f")) {
            Err(CryptoError::UnknownKey(id)) => assert_eq!(id, old.id_hex()),
            other => panic!("expected UnknownKey, got {other:?}"),
        }
    }

    /// A key is read in either base64 alphabet, padded or not; one that does not parse is
    /// named by where it came from (the flag or variable, which previous key, the key file).
    #[test]
    fn keys_parse_in_any_base64_and_bad_ones_say_where_they_came_from() {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE};
        let bytes = [0xfbu8; 32];
        let expected = MasterKey::from_bytes(&bytes).unwrap().id_hex();
        for text in [
            STANDARD.encode(bytes),
            STANDARD_NO_PAD.encode(bytes),
            URL_SAFE.encode(bytes),
            URL_SAFE_NO_PAD.encode(bytes),
        ] {
            assert_eq!(
                MasterKey::from_base64(&text).unwrap().id_hex(),
                expected,
                "{text}"
            );
        }
        let good = STANDARD.encode(bytes);
        let said = |result: Result<Keyring, CryptoError>| result.unwrap_err().to_string();
        let url = "postgres://localhost/x";
        assert!(
            said(load_keyring(Some("garbage!"), None, url))
                .contains("--master-key / TOKENWARDEN_MASTER_KEY"),
        );
        let previous = format!("{good},garbage!");
        assert!(
            said(load_keyring(Some(&good), Some(&previous), url))
                .contains("key 2 of TOKENWARDEN_PREVIOUS_MASTER_KEYS"),
        );
        let dir = std::env::temp_dir().join(format!("tw-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("t.db.key"), "garbage!").unwrap();
        let url = format!("sqlite://{}/t.db", dir.display());
        assert!(said(load_keyring(None, None, &url)).contains("t.db.key"));
        // A `file:` URI's key file is beside its file; an in-memory database's key is its own
        // and made nowhere.
        let url = format!("sqlite:file:{}/u.db?mode=rwc", dir.display());
        let made = load_keyring(None, None, &url).unwrap();
        assert_eq!(
            load_keyring(None, None, &url).unwrap().current_key_id(),
            made.current_key_id()
        );
        assert!(dir.join("u.db.key").exists());
        load_keyring(None, None, "sqlite::memory:").unwrap();
        assert!(!std::path::Path::new(":memory:.key").exists());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("tw-key-{}", new_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/tokenwarden.db?mode=rwc", dir.display());
        let first = load_keyring(None, None, &url).unwrap();
        let second = load_keyring(None, None, &url).unwrap();
        assert_eq!(first.current_key_id(), second.current_key_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("tokenwarden.db.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let error = load_keyring(None, None, "postgres://localhost/x").unwrap_err();
        assert!(error.to_string().contains("TOKENWARDEN_MASTER_KEY"));
        std::fs::remove_dir_all(dir).ok();
    }

    /// Processes started together on a new database (`serve &` then `orgs create`) agree on
    /// one key: the loser of the race read the winner's file (it failed on `AlreadyExists`, or
    /// read it half written).
    #[test]
    fn processes_starting_together_share_one_key_file() {
        for _ in 0..20 {
            let dir = std::env::temp_dir().join(format!("tw-key-race-{}", new_id()));
            std::fs::create_dir_all(&dir).unwrap();
            let url = format!("sqlite://{}/tokenwarden.db?mode=rwc", dir.display());
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let ids: Vec<String> = (0..8)
                .map(|_| {
                    let (url, barrier) = (url.clone(), std::sync::Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        barrier.wait();
                        load_keyring(None, None, &url).unwrap().current_key_id()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|thread| thread.join().unwrap())
                .collect();
            assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
            let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
            assert_eq!(left.len(), 1, "staged files left behind");
            std::fs::remove_dir_all(dir).ok();
        }
    }

    #[test]
    fn signature_matches_a_known_hmac() {
        // HMAC-SHA256("key", "1700000000.{}") computed independently with openssl.
        let signature = sign_event(b"key", 1_700_000_000, b"{}");
        assert_eq!(
            signature,
            "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    #[test]
    fn secrets_hash_and_compare() {
        let secret = new_platform_secret();
        assert!(secret.expose().len() >= 43);
        let hash = hash_secret(secret.expose());
        assert!(hashes_equal(&hash, &hash_secret(secret.expose())));
        assert!(!hashes_equal(&hash, &hash_secret("other")));
    }
}
