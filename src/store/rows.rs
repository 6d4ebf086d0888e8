//! The rows the store reads and writes: plain mirrors of the tables, ciphertexts as bytes.
//!
//! Fields ending in `_enc` are ciphertexts made above the store; fields ending in `_hash` are
//! hashes of secrets. `Debug` on every type that holds either prints only their lengths, so a
//! row formatted into a log line by mistake leaks nothing that could be attacked offline.

use std::fmt;

/// Formats an optional ciphertext or hash as its length only.
struct Redacted<'a>(Option<&'a [u8]>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(bytes) => write!(f, "[redacted {} bytes]", bytes.len()),
            None => f.write_str("None"),
        }
    }
}

fn redacted(bytes: &[u8]) -> Redacted<'_> {
    Redacted(Some(bytes))
}

fn redacted_opt(bytes: &Option<Vec<u8>>) -> Redacted<'_> {
    Redacted(bytes.as_deref())
}

/// A user, created with its organization or later.
#[derive(Clone)]
pub struct NewUser {
    pub id: i64,
    pub name: String,
    pub secret_hash: Vec<u8>,
}

impl fmt::Debug for NewUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewUser")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("secret_hash", &redacted(&self.secret_hash))
            .finish()
    }
}

/// An organization and its first user, created in one transaction.
#[derive(Clone)]
pub struct NewOrganization {
    pub id: i64,
    pub name: String,
    pub secret_hash: Vec<u8>,
    pub webhook_secret_enc: Vec<u8>,
    pub created_at: i64,
    pub first_user: NewUser,
}

impl fmt::Debug for NewOrganization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewOrganization")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("secret_hash", &redacted(&self.secret_hash))
            .field("webhook_secret_enc", &redacted(&self.webhook_secret_enc))
            .field("first_user", &self.first_user)
            .finish()
    }
}

#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OrganizationRow {
    pub id: i64,
    pub name: String,
    pub webhook_secret_enc: Vec<u8>,
    pub created_at: i64,
}

impl fmt::Debug for OrganizationRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrganizationRow")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("webhook_secret_enc", &redacted(&self.webhook_secret_enc))
            .field("created_at", &self.created_at)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRow {
    pub id: i64,
    pub organization_id: i64,
    pub name: String,
    pub created_at: i64,
}

/// An organization-defined connector, its definition as the catalog's JSON.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ConnectorRow {
    pub organization_id: i64,
    pub key: String,
    pub definition: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What the OAuth callback needs to finish an authorization started with
/// `GET /elements/{key}/oauth/url`, stored under the hash of its `state`.
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OAuthStateRow {
    pub state_hash: Vec<u8>,
    pub organization_id: i64,
    pub element_key: String,
    pub callback_url: String,
    pub api_key: String,
    pub code_verifier_enc: Option<Vec<u8>>,
    pub scope: Option<String>,
    pub expires_at: i64,
    /// The client secret given with the authorization URL's request, sealed.
    pub api_secret_enc: Option<Vec<u8>>,
}

impl fmt::Debug for OAuthStateRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthStateRow")
            .field("state_hash", &redacted(&self.state_hash))
            .field("organization_id", &self.organization_id)
            .field("element_key", &self.element_key)
            .field("callback_url", &self.callback_url)
            .field("api_key", &self.api_key)
            .field("code_verifier_enc", &redacted_opt(&self.code_verifier_enc))
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .field("api_secret_enc", &redacted_opt(&self.api_secret_enc))
            .finish()
    }
}

/// Whether an instance's grant still works. Stored as the text `valid` / `invalid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    Valid,
    Invalid,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Valid => "valid",
            InstanceState::Invalid => "invalid",
        }
    }
}

/// One instance row, every column. `tags` is a JSON array of strings, `configuration` a JSON
/// object of the non-secret configuration keys, `verification` free JSON.
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InstanceRow {
    pub id: i64,
    pub organization_id: i64,
    pub element_key: String,
    pub name: String,
    pub token_hash: Vec<u8>,
    pub token_enc: Vec<u8>,
    pub tags: String,
    pub configuration: String,
    pub access_token_enc: Option<Vec<u8>>,
    pub refresh_token_enc: Option<Vec<u8>>,
    pub token_response_enc: Option<Vec<u8>>,
    pub client_secret_enc: Option<Vec<u8>>,
    /// `valid` or `invalid`; see [`InstanceRow::instance_state`].
    pub state: String,
    pub state_reason: Option<String>,
    pub provider_message: Option<String>,
    /// 0 or 1; see [`InstanceRow::is_disabled`].
    pub disabled: i64,
    pub token_version: i64,
    pub access_expires_at: Option<i64>,
    pub refresh_expires_at: Option<i64>,
    pub last_refresh_at: Option<i64>,
    pub next_due_at: Option<i64>,
    pub refresh_lease_owner: Option<String>,
    pub refresh_lease_until: Option<i64>,
    pub refresh_in_flight_since: Option<i64>,
    pub failing_since: Option<i64>,
    pub failure_count: i64,
    pub backoff_until: Option<i64>,
    pub last_failure: Option<String>,
    pub verification: Option<String>,
    pub created_by: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Only in the row a commit of refreshed tokens answers (other reads leave it `None`): the
    /// reason of the invalidation that commit undid (see `refreshed_set!`).
    #[sqlx(default)]
    pub revived_reason: Option<String>,
}

impl InstanceRow {
    /// A new, valid instance with no tokens, no schedule and no failures: a starting point for
    /// `InstanceRow { access_token_enc: Some(..), ..InstanceRow::new(..) }`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: i64,
        organization_id: i64,
        element_key: impl Into<String>,
        name: impl Into<String>,
        token_hash: Vec<u8>,
        token_enc: Vec<u8>,
        now: i64,
    ) -> Self {
        InstanceRow {
            id,
            organization_id,
            element_key: element_key.into(),
            name: name.into(),
            token_hash,
            token_enc,
            tags: "[]".to_string(),
            configuration: "{}".to_string(),
            access_token_enc: None,
            refresh_token_enc: None,
            token_response_enc: None,
            client_secret_enc: None,
            state: InstanceState::Valid.as_str().to_string(),
            state_reason: None,
            provider_message: None,
            disabled: 0,
            token_version: 0,
            access_expires_at: None,
            refresh_expires_at: None,
            last_refresh_at: None,
            next_due_at: None,
            refresh_lease_owner: None,
            refresh_lease_until: None,
            refresh_in_flight_since: None,
            failing_since: None,
            failure_count: 0,
            backoff_until: None,
            last_failure: None,
            verification: None,
            created_by: None,
            created_at: now,
            updated_at: now,
            revived_reason: None,
        }
    }

    /// The state as a type. Anything but `invalid` reads as valid (the column has a CHECK).
    pub fn instance_state(&self) -> InstanceState {
        if self.state == InstanceState::Invalid.as_str() {
            InstanceState::Invalid
        } else {
            InstanceState::Valid
        }
    }

    pub fn is_valid(&self) -> bool {
        self.instance_state() == InstanceState::Valid
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled != 0
    }

    /// The tags, parsed from their JSON array; an unreadable value reads as no tags.
    pub fn tag_list(&self) -> Vec<String> {
        serde_json::from_str(&self.tags).unwrap_or_default()
    }
}

impl fmt::Debug for InstanceRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceRow")
            .field("id", &self.id)
            .field("organization_id", &self.organization_id)
            .field("element_key", &self.element_key)
            .field("name", &self.name)
            .field("token_hash", &redacted(&self.token_hash))
            .field("token_enc", &redacted(&self.token_enc))
            .field("tags", &self.tags)
            .field("configuration", &self.configuration)
            .field("access_token_enc", &redacted_opt(&self.access_token_enc))
            .field("refresh_token_enc", &redacted_opt(&self.refresh_token_enc))
            .field(
                "token_response_enc",
                &redacted_opt(&self.token_response_enc),
            )
            .field("client_secret_enc", &redacted_opt(&self.client_secret_enc))
            .field("state", &self.state)
            .field("state_reason", &self.state_reason)
            .field("provider_message", &self.provider_message)
            .field("disabled", &self.disabled)
            .field("token_version", &self.token_version)
            .field("access_expires_at", &self.access_expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .field("last_refresh_at", &self.last_refresh_at)
            .field("next_due_at", &self.next_due_at)
            .field("refresh_lease_owner", &self.refresh_lease_owner)
            .field("refresh_lease_until", &self.refresh_lease_until)
            .field("refresh_in_flight_since", &self.refresh_in_flight_since)
            .field("failing_since", &self.failing_since)
            .field("failure_count", &self.failure_count)
            .field("backoff_until", &self.backoff_until)
            .field("last_failure", &self.last_failure)
            .field("verification", &self.verification)
            .field("created_by", &self.created_by)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .field("revived_reason", &self.revived_reason)
            .finish()
    }
}

/// The token columns a refresh, a re-authentication or an import writes.
///
/// Every field is written as given (`None` stores NULL) except where a method says otherwise:
/// [`Store::commit_refreshed_tokens`](super::Store::commit_refreshed_tokens) keeps the stored
/// refresh token when `refresh_token_enc` is `None`, and `configuration_json: None` always means
/// "leave the configuration as it is".
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenUpdate {
    pub access_token_enc: Option<Vec<u8>>,
    pub refresh_token_enc: Option<Vec<u8>>,
    pub token_response_enc: Option<Vec<u8>>,
    pub access_expires_at: Option<i64>,
    pub refresh_expires_at: Option<i64>,
    pub last_refresh_at: Option<i64>,
    pub next_due_at: Option<i64>,
    /// The whole new configuration JSON, when the token response changed routing fields such as
    /// `base.url` (Salesforce's `instance_url`).
    pub configuration_json: Option<String>,
}

impl fmt::Debug for TokenUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenUpdate")
            .field("access_token_enc", &redacted_opt(&self.access_token_enc))
            .field("refresh_token_enc", &redacted_opt(&self.refresh_token_enc))
            .field(
                "token_response_enc",
                &redacted_opt(&self.token_response_enc),
            )
            .field("access_expires_at", &self.access_expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .field("last_refresh_at", &self.last_refresh_at)
            .field("next_due_at", &self.next_due_at)
            .field("configuration_json", &self.configuration_json)
            .finish()
    }
}

/// What a re-authentication writes besides the tokens.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct Reauthentication {
    pub tokens: TokenUpdate,
    /// `None` keeps the stored client secret; `Some(None)` removes it; `Some(Some(..))` sets it.
    pub client_secret_enc: Option<Option<Vec<u8>>>,
    pub verification: Option<String>,
    /// The writer holds the instance's lease under this owner
    /// (`RefreshEngine::with_instance_held`): written while it still does or the lease is free
    /// (a hold whose renewals failed may have lost it to another replica's refresh, which is
    /// not written under), and the lease stays, to go when the hold ends. Otherwise it is
    /// cleared (a refresh of the old grant that still runs cannot commit over the new one:
    /// the token version moved).
    pub lease_held_by: Option<String>,
    /// The claimed authorization code (its hash) the new grant came from, marked as landed on
    /// the instance in the same transaction (see `Store::code_landed`).
    pub landed_code: Option<Vec<u8>>,
    /// The name and tags (a JSON array) given with a re-authentication, written with its
    /// tokens in one statement; `None` keeps them.
    pub name: Option<String>,
    pub tags_json: Option<String>,
    /// Only while the row's `updated_at` is this (it was not written since it was read).
    pub expected_updated_at: Option<i64>,
}

/// What a conditional write expects of a row: as read, neither refreshed nor updated since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowVersion {
    pub token_version: i64,
    pub updated_at: i64,
}

impl RowVersion {
    pub fn of(row: &InstanceRow) -> RowVersion {
        RowVersion {
            token_version: row.token_version,
            updated_at: row.updated_at,
        }
    }
}

/// Where an event stands in the outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    /// Recorded only: no webhook is configured.
    None,
    Pending,
    Delivered,
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::None => "none",
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }
}

/// An event to record (and, when `delivery_state` is `Pending`, to deliver from
/// `next_attempt_at` on). The payload is the JSON body that will be signed and sent; it must never
/// hold a token or secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub id: String,
    pub organization_id: i64,
    pub instance_id: Option<i64>,
    pub element_key: Option<String>,
    pub event_type: String,
    pub reason: Option<String>,
    pub occurred_at: i64,
    pub payload: String,
    pub delivery_state: DeliveryState,
    pub next_attempt_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct EventRow {
    pub id: String,
    pub organization_id: i64,
    pub instance_id: Option<i64>,
    pub element_key: Option<String>,
    pub event_type: String,
    pub reason: Option<String>,
    pub occurred_at: i64,
    pub payload: String,
    pub delivery_state: String,
    pub attempts: i64,
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<String>,
    pub delivered_at: Option<i64>,
}

/// The position after which the next page of events starts (the last event of a page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventCursor {
    pub occurred_at: i64,
    pub id: String,
}

/// Filters of [`Store::list_events`](super::Store::list_events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub instance_id: Option<i64>,
    pub event_type: Option<String>,
    pub before: Option<EventCursor>,
    pub limit: i64,
}

/// The outcome of one delivery attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered { at: i64 },
    RetryAt(i64),
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAudit {
    pub organization_id: i64,
    pub user_id: Option<i64>,
    pub action: String,
    pub target: Option<String>,
    pub request_id: Option<String>,
    pub detail: Option<String>,
    pub at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub organization_id: i64,
    pub user_id: Option<i64>,
    /// The user's name (`tokenwarden users create --name`), when the line has a user.
    pub user_name: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub request_id: Option<String>,
    pub detail: Option<String>,
    pub at: i64,
}

/// The encrypted columns of one instance, for re-encryption under a new key. `token_version`
/// is the compare-and-swap guard against a refresh committed in between.
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EncryptedInstanceFields {
    pub id: i64,
    pub organization_id: i64,
    pub token_version: i64,
    pub token_enc: Vec<u8>,
    pub access_token_enc: Option<Vec<u8>>,
    pub refresh_token_enc: Option<Vec<u8>>,
    pub token_response_enc: Option<Vec<u8>>,
    pub client_secret_enc: Option<Vec<u8>>,
}

impl fmt::Debug for EncryptedInstanceFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedInstanceFields")
            .field("id", &self.id)
            .field("organization_id", &self.organization_id)
            .field("token_version", &self.token_version)
            .field("token_enc", &redacted(&self.token_enc))
            .field("access_token_enc", &redacted_opt(&self.access_token_enc))
            .field("refresh_token_enc", &redacted_opt(&self.refresh_token_enc))
            .field(
                "token_response_enc",
                &redacted_opt(&self.token_response_enc),
            )
            .field("client_secret_enc", &redacted_opt(&self.client_secret_enc))
            .finish()
    }
}
