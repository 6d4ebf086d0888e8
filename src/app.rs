//! The application: every long-lived part of the service, built once by `startup` and shared
//! by the HTTP handlers, the refresh engine and the background tasks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::{self, Connector};
use crate::crypto::Keyring;
use crate::oauth::{Endpoints, OAuthClient};
use crate::store::Store;

/// What `serve` (and the tests, and the demo) configure. `Debug` hides the master keys.
#[derive(Clone)]
pub struct AppConfig {
    pub database_url: String,
    pub master_key: Option<String>,
    pub previous_master_keys: Option<String>,
    /// Where the sandbox provider runs (`{sandbox}` in the catalog).
    pub sandbox_url: String,
    /// Timeout of one call to a provider's token, revocation or verification endpoint, and of
    /// a webhook delivery.
    pub provider_timeout: Duration,
    /// How long a proxied call waits for the provider's answer to start, and then between
    /// parts of its body (`serve --proxy-timeout`): long polls and sparse event streams need
    /// more than the default 30 s.
    pub proxy_timeout: Duration,
    /// Connections to PostgreSQL this process opens at most (`serve --database-pool-size`).
    pub database_pool_size: u32,
    /// A run of transient refresh failures this long fires `instance.refresh_failing`.
    pub refresh_failing_after: Duration,
    /// Largest JSON body the platform API accepts.
    pub max_body_bytes: usize,
    /// How long a connection may take to send a request's head, the first one or the next on
    /// a kept-alive connection (then it is closed): a caller that opens connections and sends
    /// nothing, or a byte at a time, no longer holds them (and the process's descriptors) for
    /// good. nginx's `keepalive_timeout` is 75 s.
    pub header_read_timeout: Duration,
    /// Caller connections served at once; past it, the oldest are asked to finish for new ones.
    /// `None`: from the open-file limit (see [`crate::startup::default_max_connections`]).
    pub max_connections: Option<usize>,
    /// Run the scheduler and the event deliverer in this process.
    pub background_tasks: bool,
    /// Scheduled refreshes run at once.
    pub refresh_concurrency: usize,
    /// Scheduled refreshes per connector and second; 0 lifts the limit.
    pub refresh_rate_per_connector: f64,
    /// How long events are kept once they are not waiting to be delivered.
    pub event_retention: Duration,
    /// Audit entries older than this are deleted; `None` keeps them.
    pub audit_retention: Option<Duration>,
    /// How long a stop waits for calls in flight before it cuts them.
    pub shutdown_timeout: Duration,
    /// The hash of the token `/metrics` asks for (`None`: open).
    pub metrics_token_hash: Option<Vec<u8>>,
    /// The proxy for token calls, revocations, verifications and webhooks, where the network's
    /// only way out is one (`HTTP(S)_PROXY` is not followed).
    pub outbound_proxy: Option<String>,
    /// How long the commit of rotated tokens is tried again while its callers wait.
    pub commit_retry_for: Duration,
    /// How long rotated tokens the store does not take are kept in memory for it after that
    /// (see `RefreshEngine::commit_parked`).
    pub rotated_tokens_kept_for: Duration,
    /// How long after a re-authentication the grant it superseded is revoked, where the
    /// connector asks for it (`oauth.revokeSupersededGrant`): calls under way with its access
    /// token, and other replicas' copies of it, end meanwhile.
    pub superseded_grant_revoked_after: Duration,
    /// Start although some secrets are sealed under master keys not given (a lost key): their
    /// instances show `state: unreadable` (see `check_key_opens_the_database`).
    pub ignore_missing_keys: bool,
    /// Open a database that `tokenwarden database copy` marked as copied away (the copy itself
    /// opens its source again); any other start on it is refused.
    pub opening_copied_source: bool,
    /// The address ranges the operator refuses as destinations (`--egress-deny`, with
    /// `--egress-allow`'s exceptions), beside the metadata addresses refused always.
    pub egress: Arc<crate::egress::Policy>,
}

impl std::fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |value: &Option<String>| value.as_ref().map(|_| "[redacted]");
        f.debug_struct("AppConfig")
            .field("database_url", &self.database_url)
            .field("master_key", &redacted(&self.master_key))
            .field(
                "previous_master_keys",
                &redacted(&self.previous_master_keys),
            )
            .field("sandbox_url", &self.sandbox_url)
            .field("egress", &self.egress)
            .field("provider_timeout", &self.provider_timeout)
            .field("proxy_timeout", &self.proxy_timeout)
            .field("database_pool_size", &self.database_pool_size)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("background_tasks", &self.background_tasks)
            .field("refresh_concurrency", &self.refresh_concurrency)
            .field(
                "refresh_rate_per_connector",
                &self.refresh_rate_per_connector,
            )
            .finish_non_exhaustive()
    }
}

impl AppConfig {
    pub fn new(database_url: impl Into<String>) -> Self {
        AppConfig {
            database_url: database_url.into(),
            master_key: None,
            previous_master_keys: None,
            sandbox_url: "http://127.0.0.1:4000".to_string(),
            provider_timeout: Duration::from_secs(30),
            proxy_timeout: Duration::from_secs(30),
            database_pool_size: crate::store::StoreOptions::default().max_connections,
            refresh_failing_after: Duration::from_millis(
                crate::events::REFRESH_FAILING_AFTER_MS as u64,
            ),
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(75),
            max_connections: None,
            background_tasks: true,
            refresh_concurrency: crate::background::SCHEDULER_CONCURRENCY,
            refresh_rate_per_connector: crate::background::RATE_PER_SECOND,
            event_retention: Duration::from_secs(30 * 86_400),
            audit_retention: None,
            metrics_token_hash: None,
            shutdown_timeout: Duration::from_secs(60),
            outbound_proxy: None,
            commit_retry_for: crate::refresh::COMMIT_RETRY_FOR,
            rotated_tokens_kept_for: crate::refresh::ROTATED_TOKENS_KEPT_FOR,
            ignore_missing_keys: false,
            opening_copied_source: false,
            superseded_grant_revoked_after: Duration::from_secs(60),
            egress: Arc::default(),
        }
    }
}

pub struct App {
    pub config: AppConfig,
    pub store: Store,
    pub keyring: Keyring,
    pub oauth: OAuthClient,
    /// The outbound HTTP client of token, revocation, verification and webhook calls (pooling,
    /// timeouts, no redirects).
    pub http: reqwest::Client,
    /// The proxy's client (hyper's, used straight): no total timeout, so bodies of any length
    /// stream; see [`crate::proxy::client`].
    pub proxy_http: std::sync::Arc<crate::proxy::client::ProxyClient>,
    /// The catalog, shared: a refresh or a cached instance takes a reference, not a copy.
    pub built_in: BTreeMap<String, Arc<Connector>>,
    /// Organizations' own connectors whose key a later release gave a built-in connector: for
    /// that organization its own stays the connector of that key. Otherwise its instances
    /// would refresh against the built-in's endpoints, sending their refresh tokens and client
    /// secret to another provider. Read at start and every minute ([`App::refresh_shadowed`]:
    /// a replica of the earlier release may register one during a rolling upgrade).
    pub shadowed: std::sync::RwLock<std::collections::HashSet<(i64, String)>>,
    /// A name for this process in refresh leases, unique per start.
    pub replica_id: String,
    pub refresh: crate::refresh::RefreshEngine,
    pub auth_cache: crate::proxy::AuthCache,
    /// Background tasks restarted after a panic since start (`/healthz` shows it).
    pub background_restarts: std::sync::atomic::AtomicU64,
    /// Caller connections open now, and the most served at once (`/healthz` shows them).
    pub connections: Connections,
    /// Set when the database turns out to have been copied away while this process ran (it was
    /// paused past the copy's wait): `serve` then stops (see `background::recovery`).
    pub copied_away: tokio::sync::Notify,
    /// The SQLite database file as [`sqlite_turn`] opened it, unlocked, kept open for as long
    /// as the app: closing any descriptor of a file drops every POSIX lock the process holds
    /// on it, SQLite's own included, and another process's SQLite then took the database for
    /// unused, checkpointed it and deleted its live write-ahead log (writes answered 2xx were
    /// lost at the next crash).
    _database_file: Option<std::fs::File>,
}

/// Caller connections open now, and the most served at once (0 until the server listens).
#[derive(Debug, Default)]
pub struct Connections {
    pub open: std::sync::atomic::AtomicU64,
    pub max: std::sync::atomic::AtomicU64,
}

pub type SharedApp = Arc<App>;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Crypto(#[from] crate::crypto::CryptoError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("could not build the HTTP client: {0}")]
    Http(String),
    /// The listening socket could not be made (the port in use, an address not on this host).
    #[error("{0}")]
    Listen(String),
    #[error("{0}")]
    WrongKey(String),
    /// The database was copied away (see `store::copy`).
    #[error("{0}")]
    Copied(String),
}

/// Refuses a master key that opens none of the database's secrets: a database restored without
/// its key file (a new one is made beside it), a typo in `TOKENWARDEN_MASTER_KEY`, or the old
/// key dropped before `keys rotate` ran. The service started healthy, and every read of a token
/// and every webhook failed.
async fn check_key_opens_the_database(
    store: &Store,
    keyring: &crate::crypto::Keyring,
    config: &AppConfig,
) -> Result<(), StartupError> {
    // The newest and the oldest: during a rotation, organizations made by replicas already
    // given the new key are the newest, and a replica still on the old key opens the others.
    // And the instances of the lowest and highest ids: a rotation goes through them by id, so
    // an interrupted one leaves the two ends under different keys.
    let organizations = store.organization_secrets_sample(8).await?;
    let instances = store.instance_secrets_sample(8).await?;
    let opens = |(id, sealed): &(i64, Vec<u8>)| {
        let binding = crate::crypto::Binding {
            table: "organizations",
            row: *id,
            field: "webhook_secret",
        };
        keyring.open(sealed, binding).is_ok()
    };
    let source = key_source(config);
    // Instances under a key given where none of the organizations opens: a rotation stopped
    // before it reached the organizations (they come last), and the new key given alone.
    if organizations.is_empty()
        || organizations.iter().any(opens)
        || instances
            .iter()
            .any(|(_, sealed)| keyring.missing_key_of(sealed).is_none())
    {
        // Some secrets open: none may be under a key not given (a rotation stopped half-way,
        // and the service started with the new key alone, or the old alone: it answered 500
        // for every instance sealed under the key it lacked while `/healthz` said ok).
        let missing = keys_missing(keyring, organizations.iter().chain(&instances));
        if missing.is_empty() {
            return Ok(());
        }
        return missing_keys(&missing, keyring, &source, config);
    }
    // Which keys they are under (by id): the one to give.
    let under = keys_missing(keyring, organizations.iter());
    Err(StartupError::WrongKey(format!(
        "the master key from {source} (key {}) opens none of this database's secrets ({} \
         organizations tried, the newest and the oldest): they are sealed under key {}. Start \
         with that key; after a change of key, keep the old one in \
         TOKENWARDEN_PREVIOUS_MASTER_KEYS until `tokenwarden keys rotate` has run",
        keyring.current_key_id(),
        organizations.len(),
        if under.is_empty() {
            "another".to_string()
        } else {
            under.join(", ")
        }
    )))
}

/// The ids of the keys `sealed` values are under that `keyring` lacks, each once.
fn keys_missing<'a>(
    keyring: &crate::crypto::Keyring,
    sealed: impl Iterator<Item = &'a (i64, Vec<u8>)>,
) -> Vec<String> {
    let mut missing: Vec<String> = sealed
        .filter_map(|(_, sealed)| keyring.missing_key_of(sealed))
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

/// Secrets sealed under the `missing` keys while others open: refused, naming the unfinished
/// rotation, unless asked to start all the same (a key that is lost).
fn missing_keys(
    missing: &[String],
    keyring: &crate::crypto::Keyring,
    source: &str,
    config: &AppConfig,
) -> Result<(), StartupError> {
    if config.ignore_missing_keys {
        tracing::error!(
            missing_keys = %missing.join(", "),
            "some of this database's secrets are sealed under master keys this process was not given; started as asked (TOKENWARDEN_IGNORE_MISSING_KEYS): their instances show `state: unreadable`"
        );
        return Ok(());
    }
    Err(StartupError::WrongKey(format!(
        "some of this database's secrets are sealed under master key {} (by id), which {source} \
         does not give, while others open with the key given: a change of key (`tokenwarden keys \
         rotate`) has not finished. Start with the new key in TOKENWARDEN_MASTER_KEY and the old \
         one in TOKENWARDEN_PREVIOUS_MASTER_KEYS (this process has key {}), and run `tokenwarden \
         keys rotate` to its end. If that key is lost, start once with \
         TOKENWARDEN_IGNORE_MISSING_KEYS=true and delete the instances that show `state: \
         unreadable`",
        missing.join(", "),
        keyring.current_key_id()
    )))
}

/// An exclusive advisory lock on a SQLite database file (`flock`, apart from SQLite's own
/// locks), held while the value lives; `None` for PostgreSQL, an in-memory database, or a file
/// that cannot be opened (the start goes on unserialized, as before).
async fn sqlite_turn(database_url: &str) -> Option<std::fs::File> {
    // The file as SQLite names it (percent-decoded, `file:` URIs resolved).
    let path = crate::store::sqlite_file(database_url)?;
    if path.is_empty() || path.contains(":memory:") || database_url.contains("mode=memory") {
        return None;
    }
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).ok()?;
        // Kept open even without the lock (a file system without `flock`): the pool's
        // connection holds SQLite's locks on it already (see `App::_database_file`).
        if let Err(error) = file.lock() {
            tracing::debug!("no turn at the migrations ({error}): the start goes on unserialized");
        }
        Some(file)
    })
    .await
    .ok()
    .flatten()
}

/// What a key check seals.
pub(crate) const KEY_CHECK_TEXT: &[u8] = b"tokenwarden key check";

/// The binding of a key check's sealed value.
pub fn key_check_binding(id: i64) -> crate::crypto::Binding<'static> {
    crate::crypto::Binding {
        table: "key_checks",
        row: id,
        field: "check",
    }
}

/// The id of the key check every process compares its keys with.
const FIRST_KEY_CHECK: i64 = 1;

/// Refuses a master key that does not open the key check the first process to start on the
/// database sealed: two replicas started with different keys on a new database (nothing
/// sealed yet for [`check_key_opens_the_database`] to try) each sealed instances and
/// organizations the other could not open. Of processes starting at once, the database keeps
/// one check (its primary key); `keys rotate` re-seals it under the new key.
async fn check_key_matches_the_first(
    store: &Store,
    keyring: &crate::crypto::Keyring,
    config: &AppConfig,
) -> Result<(), StartupError> {
    store
        .insert_key_check(
            FIRST_KEY_CHECK,
            &keyring.seal(KEY_CHECK_TEXT, key_check_binding(FIRST_KEY_CHECK)),
        )
        .await?;
    let checks = store.key_checks().await?;
    let opens = checks.iter().any(|(id, sealed)| {
        *id == FIRST_KEY_CHECK && keyring.open(sealed, key_check_binding(*id)).is_ok()
    });
    if opens {
        return Ok(());
    }
    // The check under a key not given while the secrets open: a rotation stopped after the
    // instances and organizations, before the check (it comes last), not another replica's key.
    let missing = keys_missing(
        keyring,
        checks.iter().filter(|(id, _)| *id == FIRST_KEY_CHECK),
    );
    if !missing.is_empty() {
        let organizations = store.organization_secrets_sample(8).await?;
        let instances = store.instance_secrets_sample(8).await?;
        let ours = organizations
            .iter()
            .chain(&instances)
            .any(|(_, sealed)| keyring.missing_key_of(sealed).is_none());
        if ours {
            return missing_keys(&missing, keyring, &key_source(config), config);
        }
    }
    Err(StartupError::WrongKey(format!(
        "the master key from {} does not open this database's key check: another replica \
         started on it with a different key. Give every replica the same \
         TOKENWARDEN_MASTER_KEY (and, during a rotation, the old key in \
         TOKENWARDEN_PREVIOUS_MASTER_KEYS)",
        key_source(config)
    )))
}

/// Where the master key came from, for a refusal.
pub(crate) fn key_source(config: &AppConfig) -> String {
    match (
        config
            .master_key
            .as_deref()
            .filter(|key| !key.trim().is_empty()),
        crate::crypto::sqlite_path(&config.database_url),
    ) {
        (Some(_), _) => {
            "--master-key / TOKENWARDEN_MASTER_KEY (and TOKENWARDEN_PREVIOUS_MASTER_KEYS)"
                .to_string()
        }
        (None, Some(path)) => format!("the key file {path}.key"),
        (None, None) => "no key".to_string(),
    }
}

/// `--outbound-proxy` as a proxy: an http(s) URL (reqwest would take any scheme and then send
/// nothing through one it cannot speak: `htpp://…` went direct, `socks5://…` failed every call),
/// used for every destination but loopback (the sandbox, a provider on this machine: a proxy
/// out of the network cannot reach them). Its user info never appears in a message.
fn outbound_proxy_of(text: &str) -> Result<reqwest::Proxy, StartupError> {
    let refused = |why: &str| {
        let shown = crate::secret::url_without_credentials(text)
            .unwrap_or_else(|| "(not a URL)".to_string());
        StartupError::Http(format!("the outbound proxy {shown} is not usable: {why}"))
    };
    let url = url::Url::parse(text).map_err(|_| refused("it is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(refused(
            "give an http:// or https:// proxy with a host (SOCKS is not supported)",
        ));
    }
    let proxy = reqwest::Proxy::all(url.as_str()).map_err(|error| refused(&error.to_string()))?;
    Ok(proxy.no_proxy(reqwest::NoProxy::from_string("localhost,127.0.0.1,::1")))
}

/// The outbound HTTP client: redirects are never followed (a redirect would carry a token or a
/// client secret to another host), bounded timeouts, a pool large enough for proxy load.
pub fn build_http_client(timeout: Duration) -> Result<reqwest::Client, StartupError> {
    build_http_client_through(timeout, None, Arc::default())
}

/// [`build_http_client`], through `outbound_proxy` when one is given (`serve
/// --outbound-proxy`, for networks whose only way out is a proxy: token calls, revocations,
/// verifications and webhooks go through it; the proxy resolves names itself, so the guard
/// against metadata addresses sees only IP literals then).
pub fn build_http_client_through(
    timeout: Duration,
    outbound_proxy: Option<&str>,
    egress: Arc<crate::egress::Policy>,
) -> Result<reqwest::Client, StartupError> {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // `HTTP(S)_PROXY` from the environment is not followed: a proxy resolves names itself,
        // past the egress guard below, and one set for a machine's other traffic sent the
        // service's calls to loopback (the sandbox, the demo) through it. The proxied calls'
        // own client never used one either. A proxy is used only when named.
        .no_proxy();
    if let Some(url) = outbound_proxy.filter(|url| !url.trim().is_empty()) {
        builder = builder.proxy(outbound_proxy_of(url)?);
    }
    builder
        .dns_resolver(Arc::new(crate::egress::GuardedResolver(egress)))
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .user_agent(concat!("tokenwarden/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|error| StartupError::Http(error.to_string()))
}

/// rustls needs one process-wide crypto provider; ring is the one every crate here uses.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl App {
    pub async fn build(config: AppConfig) -> Result<SharedApp, StartupError> {
        Store::check_url(&config.database_url)?;
        let load = |make_key_file| {
            crate::crypto::load_keyring_making(
                config.master_key.as_deref(),
                config.previous_master_keys.as_deref(),
                &config.database_url,
                make_key_file,
            )
        };
        // A key that does not parse (or none with PostgreSQL) is said before the database is
        // opened or made; only a missing key file waits for what the database holds.
        let keyring = match load(false) {
            Err(error @ crate::crypto::CryptoError::KeyFileMissing { .. }) => Err(error),
            Err(error) => return Err(error.into()),
            Ok(keyring) => Ok(keyring),
        };
        // The key is checked before the schema is brought up to date: a replica started with
        // a wrong key changes nothing.
        let replica_id = format!(
            "replica-{}",
            crate::crypto::hex(&crate::crypto::random_bytes::<6>())
        );
        let store = Store::open_with(
            &config.database_url,
            crate::store::StoreOptions {
                max_connections: config.database_pool_size,
                application_name: Some(format!("tokenwarden {replica_id}")),
                ..crate::store::StoreOptions::default()
            },
        )
        .await?;
        // A damaged SQLite file (a backup copied over a file whose leftover `-wal` SQLite then
        // replayed onto it) started healthy, and its refreshes and event reads failed.
        if let Some(problem) = store.sqlite_damage().await? {
            return Err(StartupError::Store(crate::store::damaged_sqlite(
                &config.database_url,
                &problem,
            )));
        }
        let has_schema = store.has_schema().await?;
        let keyring = match keyring {
            Err(crate::crypto::CryptoError::KeyFileMissing { path }) => {
                // A key file is made for a database with nothing sealed in it yet. One that
                // holds secrets was sealed with a key kept elsewhere (lost, or given in
                // TOKENWARDEN_MASTER_KEY before): unless another process made the file
                // meanwhile (`orgs create` beside `serve` on a new database), say so.
                // (A key check counts: the first start sealed it. Before migration 0009 there
                // is no such table.)
                let sealed = has_schema
                    && (!store.organization_secrets_sample(1).await?.is_empty()
                        || store
                            .key_checks()
                            .await
                            .is_ok_and(|checks| !checks.is_empty()));
                match load(!sealed) {
                    Err(crate::crypto::CryptoError::KeyFileMissing { .. }) => {
                        return Err(StartupError::WrongKey(format!(
                            "this database holds sealed secrets but its key file {path} is \
                             missing, and TOKENWARDEN_MASTER_KEY is not set: restore the key \
                             file from your backup, or set TOKENWARDEN_MASTER_KEY to the key \
                             the database was used with (no new key is made for it)"
                        )));
                    }
                    other => other?,
                }
            }
            other => other?,
        };
        if has_schema {
            check_key_opens_the_database(&store, &keyring, &config).await?;
        }
        // Processes starting at once on one SQLite file take turns (PostgreSQL's migrator
        // locks for itself): run side by side, their migrations failed with "table already
        // exists".
        let turn = sqlite_turn(&config.database_url).await;
        store.migrate().await?;
        // A service says it runs before it looks for the mark of a copy: a copy that writes
        // its mark, then looks for running services, sees it or is seen (see `store::copy`).
        if config.background_tasks {
            store
                .replica_seen(&replica_id, now_ms(), &keyring.current_key_id())
                .await?;
        }
        if !config.opening_copied_source
            && let Some((target, at)) = store.copied_to().await?
        {
            if config.background_tasks {
                let _ = store.replica_gone(&replica_id).await;
            }
            return Err(StartupError::Copied(format!(
                "this database was copied to {target} at {} (`tokenwarden database copy`), and \
                 the service runs there now: started here as well, both would refresh the same \
                 grants, and at providers that rotate refresh tokens each would end the other's. \
                 If that copy is abandoned, run `tokenwarden database reopen` on this database \
                 first",
                crate::instances::iso8601(at)
            )));
        }
        check_key_matches_the_first(&store, &keyring, &config).await?;
        // The turn ends; the file stays open (see `App::_database_file`).
        let database_file = turn.inspect(|file| {
            let _ = file.unlock();
        });
        align_clock(&store).await;
        let built_in: BTreeMap<String, Arc<Connector>> = catalog::load_built_in()?
            .into_iter()
            .map(|connector| (connector.key.clone(), Arc::new(connector)))
            .collect();
        let shadowed = shadowed_keys(&store, &built_in).await?;
        for (organization_id, key) in &shadowed {
            tracing::warn!(
                organization_id,
                key,
                "an organization's own connector has the key of a built-in connector: it stays that organization's `{key}`"
            );
        }
        let shadowed = std::sync::RwLock::new(shadowed);
        let http = build_http_client_through(
            config.provider_timeout,
            config.outbound_proxy.as_deref(),
            Arc::clone(&config.egress),
        )?;
        crate::telemetry::install_metrics();
        let proxy_http = std::sync::Arc::new(
            crate::proxy::client::build(Arc::clone(&config.egress)).map_err(StartupError::Http)?,
        );
        let app = Arc::new(App {
            proxy_http,
            // Token calls get the configured provider timeout (the client's default is 30 s).
            oauth: OAuthClient::new(http.clone())
                .with_timeout(config.provider_timeout)
                .with_egress(Arc::clone(&config.egress)),
            http,
            keyring,
            store,
            built_in,
            shadowed,
            refresh: crate::refresh::RefreshEngine::new(),
            auth_cache: crate::proxy::AuthCache::default(),
            background_restarts: std::sync::atomic::AtomicU64::new(0),
            copied_away: tokio::sync::Notify::new(),
            connections: Connections::default(),
            _database_file: database_file,
            replica_id,
            config,
        });
        app.refresh.know_app(&app);
        Ok(app)
    }

    /// Whose connector `key` is, as seen from `organization_id`: `None` for a built-in one
    /// (every organization shares its provider), else the organization. Per-connector limits
    /// and recoveries are kept per this scope.
    pub fn connector_owner(&self, organization_id: i64, key: &str) -> Option<i64> {
        (!self.is_built_in(organization_id, key)).then_some(organization_id)
    }

    /// Reads [`App::shadowed`] again from the store.
    pub async fn refresh_shadowed(&self) {
        match shadowed_keys(&self.store, &self.built_in).await {
            Ok(keys) => {
                *self
                    .shadowed
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
            }
            Err(error) => tracing::warn!("reading connector keys: {error}"),
        }
    }

    /// Whether `key` names a built-in connector for this organization (not when the
    /// organization has its own of that key: see [`App::shadowed`]).
    pub fn is_built_in(&self, organization_id: i64, key: &str) -> bool {
        if !self.built_in.contains_key(key) {
            return false;
        }
        let shadowed = self
            .shadowed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shadowed.is_empty() || !shadowed.contains(&(organization_id, key.to_string()))
    }

    /// Whether `connector` is the catalog's own, as [`App::connector`] hands it out (the same
    /// allocation), rather than an organization's.
    pub fn is_catalog_connector(&self, connector: &Connector) -> bool {
        self.built_in
            .get(&connector.key)
            .is_some_and(|built_in| std::ptr::eq(built_in.as_ref(), connector))
    }

    /// A connector visible to an organization: built-in, or its own.
    pub async fn connector(
        &self,
        organization_id: i64,
        key: &str,
    ) -> Result<Option<Arc<Connector>>, crate::store::StoreError> {
        let built_in = self.built_in.get(key);
        if let Some(connector) = built_in
            && self.is_built_in(organization_id, key)
        {
            return Ok(Some(Arc::clone(connector)));
        }
        let Some(definition) = self.store.get_connector(organization_id, key).await? else {
            // An organization's own that shadowed a built-in, deleted since the start.
            return Ok(built_in.cloned());
        };
        Ok(serde_json::from_str(&definition.definition)
            .ok()
            .map(Arc::new))
    }

    /// Fills a connector template (`{sandbox}`, inputs from the configuration or their defaults;
    /// `{client_id}` stays for the OAuth client, which fills it where it is allowed).
    pub fn fill(
        &self,
        connector: &Connector,
        template: &str,
        configuration: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, String> {
        catalog::fill_template(template, &self.template_values(connector, configuration)?)
    }

    /// The connector's endpoints and OAuth settings for this configuration, the inputs filled
    /// in once for both: the URLs (checked), and the scopes and extra parameters (Dynamics'
    /// `https://{org}.crm.dynamics.com/…` scope). In scopes and parameters a `{…}` that names
    /// no input stays as it is: their values may hold braces of their own (a JSON `claims`).
    pub fn oauth_settings(
        &self,
        connector: &Connector,
        configuration: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(Endpoints, crate::catalog::OAuthSpec), String> {
        let values = self.template_values(connector, configuration)?;
        let fill = |text: &mut String| {
            for (name, value) in &values {
                let placeholder = format!("{{{name}}}");
                if text.contains(&placeholder) {
                    *text = text.replace(&placeholder, value);
                }
            }
        };
        let mut spec = connector.oauth.clone();
        spec.scopes.iter_mut().for_each(&fill);
        for params in [
            &mut spec.authorization_params,
            &mut spec.token_params,
            &mut spec.refresh_params,
        ] {
            params.values_mut().for_each(&fill);
        }
        // A connector that names a scope on refresh (Microsoft's: the scope selects the
        // resource) asks for the instance's own when its authorization asked for another: the
        // connector's would narrow or widen what the user consented to (a widening is refused,
        // `invalid_grant`, and ended the instance).
        if let Some(asked) = configuration
            .get(crate::instances::SCOPE)
            .and_then(serde_json::Value::as_str)
            .filter(|scope| !scope.trim().is_empty())
            && let Some(scope) = spec.refresh_params.get_mut("scope")
        {
            *scope = asked.to_string();
        }
        Ok((
            endpoints_from(&connector.oauth, &values, &self.config.egress)?,
            spec,
        ))
    }

    fn template_values(
        &self,
        connector: &Connector,
        configuration: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<BTreeMap<String, String>, String> {
        let mut values = BTreeMap::new();
        values.insert("client_id".to_string(), "{client_id}".to_string());
        values.insert(
            "sandbox".to_string(),
            self.config.sandbox_url.trim_end_matches('/').to_string(),
        );
        for (name, input) in &connector.inputs {
            let given = configuration
                .get(name)
                .and_then(|value| value.as_str())
                .map(str::to_string)
                .or_else(|| input.default.clone());
            if let Some(value) = given {
                // An input fills one part of a URL (a shop, a tenant, a My Domain host): it may
                // not bring a path, a query, a port or credentials of its own.
                // Nor be a dot segment: `..` in a path climbs out of its part
                // (`…/{tenant}/oauth2/token` became `…/oauth2/token` elsewhere on the host).
                let plain = !value.is_empty()
                    && value.len() <= 253
                    && value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                    && !value.chars().all(|c| c == '.');
                if !plain {
                    return Err(format!(
                        "connector input `{name}` may hold only letters, digits, `.`, `-` and `_`, and not dots alone"
                    ));
                }
                values.insert(name.clone(), value);
            }
        }
        Ok(values)
    }

    /// The connector's endpoint URLs for this configuration, filled and checked.
    pub fn endpoints(
        &self,
        connector: &Connector,
        configuration: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Endpoints, String> {
        endpoints_from(
            &connector.oauth,
            &self.template_values(connector, configuration)?,
            &self.config.egress,
        )
    }
}

fn endpoints_from(
    oauth: &crate::catalog::OAuthSpec,
    values: &BTreeMap<String, String>,
    egress: &crate::egress::Policy,
) -> Result<Endpoints, String> {
    let url = |template: &str| {
        let url = catalog::fill_template(template, values)?;
        egress.check_text(&url).map(|()| url)
    };
    let token_url = url(&oauth.token_url)?;
    // The authorization URL is for the user's browser: only the addresses refused always
    // count, not the operator's ranges (which keep the service's own calls in).
    let authorization_url = catalog::fill_template(&oauth.authorization_url, values)?;
    crate::egress::Policy::default().check_text(&authorization_url)?;
    Ok(Endpoints {
        authorization_url,
        refresh_url: match &oauth.refresh_url {
            Some(template) => url(template)?,
            None => token_url.clone(),
        },
        token_url,
        revoke_url: oauth.revoke_url.as_deref().map(url).transpose()?,
    })
}

/// The organizations' own connectors whose keys are those of built-in ones.
async fn shadowed_keys(
    store: &Store,
    built_in: &BTreeMap<String, Arc<Connector>>,
) -> Result<std::collections::HashSet<(i64, String)>, crate::store::StoreError> {
    Ok(store
        .connector_keys()
        .await?
        .into_iter()
        .filter(|(_, key)| built_in.contains_key(key))
        .collect())
}

/// The wall clock in epoch milliseconds, on the database's clock when that is PostgreSQL
/// (see [`align_clock`]). Counted on the monotonic clock from the last alignment: a step of
/// this machine's wall clock (an NTP correction, a virtual machine restored) does not move it
/// until the next alignment, a minute later at most, when PostgreSQL's clock says where it is.
/// A replica whose wall clock stepped back a minute wrote leases that had run out already, and
/// another replica took over its refreshes; stepped forward, it dated tokens' expiries in the
/// future, and nothing refreshed them. (Not `OffsetDateTime::now_utc`: it works out the
/// calendar date on every call, and the proxy asks the time on every call.)
pub fn now_ms() -> i64 {
    let base = CLOCK_BASE_MS.load(std::sync::atomic::Ordering::Relaxed);
    let base = if base == i64::MIN {
        follow_the_wall_clock()
    } else {
        base
    };
    base + monotonic_ms()
}

/// How far the clock the service goes by ([`now_ms`]: the database's, with PostgreSQL) is
/// ahead of this machine's wall clock, in milliseconds, now: the offset measured at the last
/// reading, and any step of the wall clock since (an NTP correction).
pub fn clock_offset_ms() -> i64 {
    now_ms() - system_now_ms()
}

/// This machine's wall clock in epoch milliseconds.
pub fn system_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// Milliseconds on the monotonic clock since the process first asked.
fn monotonic_ms() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as i64
}

/// [`now_ms`] minus [`monotonic_ms`]; `i64::MIN` until first set.
static CLOCK_BASE_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(i64::MIN);

/// Puts [`now_ms`] on this machine's wall clock as it reads now; answers the base.
fn follow_the_wall_clock() -> i64 {
    let base = system_now_ms() - monotonic_ms();
    CLOCK_BASE_MS.store(base, std::sync::atomic::Ordering::Relaxed);
    base
}

/// How far off the database's clock this machine's may be before it is said in the log.
pub const CLOCK_OFFSET_WARNING_MS: i64 = 1_000;

/// Puts [`now_ms`] on the database's clock when that is PostgreSQL (replicas compare each
/// other's refresh leases, an end time written by one and read by the others, so they must
/// read one clock: with this machine's clock 8 s ahead of another replica's, it would see that
/// replica's live leases as run out and present the same refresh token beside it); on this
/// machine's wall clock with SQLite, read by one process (a step of it is followed from here).
/// At start and once a minute.
pub async fn align_clock(store: &Store) {
    match store.clock_offset_ms(monotonic_ms).await {
        Ok(Some(base)) => {
            let offset = base + monotonic_ms() - system_now_ms();
            if offset.abs() > CLOCK_OFFSET_WARNING_MS {
                tracing::warn!(
                    offset_ms = offset,
                    "this machine's clock is off the database's; refresh leases follow the database's"
                );
            }
            CLOCK_BASE_MS.store(base, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(None) if store.engine() == crate::store::Engine::Postgres => tracing::warn!(
            "the database's clock could not be read within its time limit; refresh leases keep the clock of the last reading until the next try"
        ),
        Ok(None) => {
            follow_the_wall_clock();
        }
        Err(error) => tracing::warn!("reading the database's clock: {error}"),
    }
}
