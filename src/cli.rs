//! The command line: `serve`, `sandbox`, `demo`, `orgs create`, `users create`, `keys rotate`.
//! Each command parses its flags (with environment fallbacks) and calls the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The slowest `--refresh-rate` other than 0: one refresh per connector in 1,000 s.
const MIN_REFRESH_RATE: f64 = 0.001;

#[derive(Debug, Parser)]
#[command(
    name = "tokenwarden",
    version,
    about = "OAuth 2.0 connection service: instances, refresh, proxy, revocation"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(ServeArgs),
    /// Run the sandbox OAuth 2.0 provider.
    Sandbox(SandboxArgs),
    /// Walk the re-authentication scenario of the articles against a temporary service and sandbox.
    Demo,
    /// Organizations.
    Orgs {
        #[command(subcommand)]
        command: OrgsCommand,
    },
    /// Users of an organization.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Instances of a running server.
    Instances {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: InstancesCommand,
    },
    /// Connectors of a running server.
    Connectors {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: ConnectorsCommand,
    },
    /// Master keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The database itself.
    Database {
        #[command(subcommand)]
        command: DatabaseCommand,
    },
}

#[derive(Args, Clone)]
pub struct DatabaseArgs {
    /// `sqlite://path` (embedded, the default) or `postgres://…` (several replicas).
    #[arg(
        long,
        env = "TOKENWARDEN_DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://tokenwarden.db"
    )]
    pub database_url: String,
    /// Base64 of 32 bytes; required with PostgreSQL (the same on every replica). With SQLite
    /// and none set, a key file is created beside the database.
    #[arg(long, env = "TOKENWARDEN_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Older master keys (comma-separated base64) still accepted for reading, during a rotation.
    #[arg(long, env = "TOKENWARDEN_PREVIOUS_MASTER_KEYS", hide_env_values = true)]
    pub previous_master_keys: Option<String>,
    /// Start although some secrets are sealed under a master key not given (a key that is lost:
    /// delete the instances that show `state: unreadable`). Without it, such a start is refused.
    #[arg(long, env = "TOKENWARDEN_IGNORE_MISSING_KEYS", hide_env_values = true)]
    pub ignore_missing_keys: bool,
}

/// `Debug` hides the master keys (the command line is `Debug`).
impl std::fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |value: &Option<String>| value.as_ref().map(|_| "[redacted]");
        f.debug_struct("DatabaseArgs")
            .field("database_url", &self.database_url)
            .field("master_key", &redacted(&self.master_key))
            .field(
                "previous_master_keys",
                &redacted(&self.previous_master_keys),
            )
            .finish()
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where the service listens (address:port; 0.0.0.0 for every interface; a name such as
    /// `localhost:8080` listens on its first IPv4 address).
    #[arg(
        long,
        env = "TOKENWARDEN_BIND",
        hide_env_values = true,
        default_value = "127.0.0.1:8080",
        value_parser = bind_address
    )]
    pub bind: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Where the sandbox provider runs, for the catalog's `sandbox-*` connectors.
    #[arg(
        long,
        env = "TOKENWARDEN_SANDBOX_URL",
        default_value = "http://127.0.0.1:4000",
        hide_env_values = true
    )]
    pub sandbox_url: String,
    /// A proxy for token calls, revocations, verifications and webhooks, where the network's
    /// only way out is one (`HTTP(S)_PROXY` is not followed). Proxied API calls go direct.
    #[arg(long, env = "TOKENWARDEN_OUTBOUND_PROXY", hide_env_values = true)]
    pub outbound_proxy: Option<String>,
    /// Address ranges no connector, `base.url`, token call or webhook may reach:
    /// comma-separated IP addresses, CIDR ranges and `private` (loopback, RFC 1918, 100.64/10,
    /// 198.18/15, ::1, fc00::/7). For a service shared by organizations that do not trust each other:
    /// `private` keeps them from the service's own ports and the private network.
    /// Link-local and cloud metadata addresses are refused always.
    #[arg(
        long,
        env = "TOKENWARDEN_EGRESS_DENY",
        hide_env_values = true,
        default_value = ""
    )]
    pub egress_deny: String,
    /// Ranges taken back out of `--egress-deny` (an in-house OAuth server's subnet), in the
    /// same form.
    #[arg(
        long,
        env = "TOKENWARDEN_EGRESS_ALLOW",
        hide_env_values = true,
        default_value = ""
    )]
    pub egress_allow: String,
    /// Runtime worker threads (default: one per core). With 1, everything runs on one thread
    /// without work stealing (tokio's current-thread scheduler), which is the fastest setting
    /// when the service shares a small machine with its load.
    /// 0 means one per core too.
    #[arg(long, env = "TOKENWARDEN_WORKERS", hide_env_values = true, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub workers: Option<u16>,
    /// Scheduled refreshes run at once in this replica.
    #[arg(long, env = "TOKENWARDEN_REFRESH_CONCURRENCY", hide_env_values = true, default_value_t = crate::background::SCHEDULER_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub refresh_concurrency: u16,
    /// Scheduled refreshes per connector and second in this replica (a provider's token
    /// endpoint is not flooded when many instances fall due at once); 0 lifts the limit.
    #[arg(long, env = "TOKENWARDEN_REFRESH_RATE", hide_env_values = true, default_value_t = crate::background::RATE_PER_SECOND)]
    pub refresh_rate: f64,
    /// Seconds a connection has to send a request head, the first or the next one on a
    /// kept-alive connection; then it is closed. Behind a load balancer that keeps idle
    /// connections to its backends longer (Google Cloud's: 600 s), set it above that.
    #[arg(long, env = "TOKENWARDEN_IDLE_TIMEOUT", hide_env_values = true, default_value_t = 75, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub idle_timeout: u32,
    /// Seconds a proxied call waits for the provider's answer to start, and then between
    /// parts of its body (the answer is cut after that long without a byte). Long polls
    /// (Salesforce's streaming API holds one 110 s), slow reports and sparse event streams
    /// need more.
    #[arg(long, env = "TOKENWARDEN_PROXY_TIMEOUT", hide_env_values = true, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub proxy_timeout: u32,
    /// Connections to PostgreSQL this replica opens at most (SQLite uses one). Replicas times
    /// this must stay below the server's `max_connections` (100 by default) less what other
    /// clients use; a call waits up to 10 s for a free one.
    #[arg(long, env = "TOKENWARDEN_DATABASE_POOL_SIZE", hide_env_values = true, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub database_pool_size: u32,
    /// Caller connections served at once; past it, the oldest are asked to finish for new ones
    /// (an idle kept-alive one closes at once, a busy one after its answer).
    /// Default: half of what the open-file limit (raised to its hard limit at start) leaves
    /// after 256 kept for the database and providers, as each call in flight holds a
    /// connection to a provider as well.
    #[arg(long, env = "TOKENWARDEN_MAX_CONNECTIONS", hide_env_values = true, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections: Option<u32>,
    /// Events (and their delivery records) older than this many days are deleted, except those
    /// still waiting to be delivered; the audit log has its own retention.
    #[arg(long, env = "TOKENWARDEN_EVENT_RETENTION_DAYS", hide_env_values = true, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub event_retention_days: u32,
    /// Audit-log entries older than this many days are deleted; 0 (the default) keeps them all.
    #[arg(long, env = "TOKENWARDEN_AUDIT_RETENTION_DAYS", hide_env_values = true, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=36500))]
    pub audit_retention_days: u32,
    /// When set, `GET /metrics` answers only `Authorization: Bearer <this>` (Prometheus's
    /// `authorization` / `bearer_token_file`); without it the metrics are open to whoever
    /// reaches the port. Give it in the environment: a command line is visible in `ps`.
    /// At least 16 printable ASCII characters.
    #[arg(long, env = "TOKENWARDEN_METRICS_TOKEN", hide_env_values = true, value_parser = |text: &str| Ok::<_, String>(crate::secret::Secret::new(text)))]
    pub metrics_token: Option<crate::secret::Secret>,
    /// Seconds a stop (SIGTERM) waits for calls in flight (slow answers, long transfers) to
    /// finish before it cuts them; new connections are refused at once. Refreshes under way
    /// finish and commit after it, for up to 80 s more: give the process this and 80 s.
    /// 1 to 3,600.
    #[arg(long, env = "TOKENWARDEN_SHUTDOWN_TIMEOUT", hide_env_values = true, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=3_600))]
    pub shutdown_timeout: u32,
}

/// An address to listen on: `IP:port`, or `name:port` (`localhost:8080`) resolved here, its
/// IPv4 address first.
fn bind_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    use std::net::ToSocketAddrs;
    let addresses: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|error| {
            format!("an address:port (127.0.0.1:8080, [::1]:8080, localhost:8080): {error}")
        })?
        .collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or(addresses.first())
        .copied()
        .ok_or_else(|| format!("{text} names no address"))
}

/// The hash of a metrics token, refused when shorter than 16 characters or holding what a
/// header cannot carry. Checked here rather than by clap, whose refusal repeats the value.
fn metrics_token_hash(token: &crate::secret::Secret) -> Result<Vec<u8>, String> {
    let text = token.expose();
    if text.len() < 16 || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "--metrics-token / TOKENWARDEN_METRICS_TOKEN: at least 16 printable ASCII characters, without spaces"
                .to_string(),
        );
    }
    Ok(crate::crypto::hash_secret(text))
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Where the sandbox provider listens (address:port).
    #[arg(
        long,
        env = "TOKENWARDEN_SANDBOX_BIND",
        hide_env_values = true,
        default_value = "127.0.0.1:4000",
        value_parser = bind_address
    )]
    pub bind: SocketAddr,
    /// Accept only this client: `ID:SECRET`. Without it any id/secret pair is accepted.
    #[arg(long)]
    pub client: Option<String>,
}

#[derive(Args, Clone)]
pub struct RemoteArgs {
    /// The server to speak to.
    #[arg(
        long,
        env = "TOKENWARDEN_URL",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// The user secret (`userSecret` of `orgs create`); better in the environment than on the
    /// command line, where other users of the machine see it.
    #[arg(
        long,
        env = "TOKENWARDEN_USER_SECRET",
        hide_env_values = true,
        default_value = "",
        hide_default_value = true,
        global = true
    )]
    pub user_secret: String,
    /// The organization secret (`organizationSecret` of `orgs create`); better in the
    /// environment too.
    #[arg(
        long,
        env = "TOKENWARDEN_ORG_SECRET",
        hide_env_values = true,
        default_value = "",
        hide_default_value = true,
        global = true
    )]
    pub org_secret: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl std::fmt::Debug for RemoteArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteArgs")
            .field("url", &self.url)
            .field("user_secret", &"[redacted]")
            .field("org_secret", &"[redacted]")
            .field("json", &self.json)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// The organization's instances.
    List,
    /// One instance, with its configuration (secrets masked).
    Show {
        /// The instance id.
        id: i64,
    },
    /// Refresh the access token now.
    Refresh {
        /// The instance id.
        id: i64,
    },
    /// Revoke at the provider; the instance turns invalid.
    Revoke {
        /// The instance id.
        id: i64,
    },
    /// Enable: provider calls and refreshes resume.
    Enable {
        /// The instance id.
        id: i64,
    },
    /// Disable: no provider calls, no refreshes.
    Disable {
        /// The instance id.
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConnectorsCommand {
    /// The catalog: built-in connectors and the organization's own.
    List {
        /// Only the connectors of this category (e.g. crm, sandbox).
        #[arg(long)]
        category: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// Create an organization and its first user; prints their secrets as JSON.
    Create {
        /// The organization's name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Give an organization a new secret (the old one, leaked, is refused from the next request
    /// on); prints it as JSON.
    RotateSecret {
        /// The organization (its `organizationId`).
        #[arg(long)]
        organization_id: i64,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create another user in an organization; prints its secret as JSON.
    Create {
        /// The organization (its `organizationId`).
        #[arg(long)]
        organization_id: i64,
        /// The user's name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List an organization's users (ids and names; secrets are kept only as hashes).
    List {
        /// The organization (its `organizationId`).
        #[arg(long)]
        organization_id: i64,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Give a user a new secret (the old one, leaked, is refused within seconds); prints it as
    /// JSON.
    RotateSecret {
        /// The organization (its `organizationId`).
        #[arg(long)]
        organization_id: i64,
        /// The user (its `userId`, from `users list`).
        #[arg(long)]
        user_id: i64,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Delete a user: its secret is refused within seconds; the audit log keeps its entries.
    Delete {
        /// The organization (its `organizationId`).
        #[arg(long)]
        organization_id: i64,
        /// The user (its `userId`, from `users list`).
        #[arg(long)]
        user_id: i64,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-encrypt everything under the current master key (`TOKENWARDEN_MASTER_KEY`); the old
    /// one goes in `TOKENWARDEN_PREVIOUS_MASTER_KEYS` until this has finished.
    Rotate {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Run even while a replica seen in the last minute seals under another key (one
        /// killed rather than stopped, whose row has not been forgotten yet).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DatabaseCommand {
    /// Copy every row into another, empty database: SQLite into PostgreSQL to run several
    /// replicas (or back). Stop every `serve` on the source first; start the service on the
    /// copy with the source's master key, and never again on the source.
    Copy(CopyArgs),
    /// Take away the mark `copy` left on its source, so that the service starts on it again
    /// (the copy abandoned). Never while a service runs on the copy.
    Reopen {
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Args)]
pub struct CopyArgs {
    /// The source.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The database to copy into, empty: `postgres://…` or `sqlite://path` (the file is made when missing; its directory must exist).
    /// A password in it is better given in the environment (`TOKENWARDEN_COPY_TO`) than on the
    /// command line, where other users of the machine see it.
    #[arg(long, env = "TOKENWARDEN_COPY_TO", hide_env_values = true)]
    pub to: String,
}

/// `Debug` shows the target without its password.
impl std::fmt::Debug for CopyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyArgs")
            .field("database", &self.database)
            .field("to", &crate::secret::url_without_credentials(&self.to))
            .finish()
    }
}

/// Writes a line of a command's output; when its reader has stopped (a closed pipe), ends the
/// process quietly with status 141, as a shell reports a command SIGPIPE ended (`pipefail`
/// sees it: the output may have held the only copy of new secrets). SIGPIPE stays ignored, as
/// Rust sets it: restored to its default, a reset connection's `writev` would kill a command
/// without a word.
pub fn write_out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"));
    match written {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(error) => {
            eprintln!("tokenwarden: writing the output: {error}");
            std::process::exit(1);
        }
    }
}

/// `--sandbox-url`: an http(s) URL with a host (the sandbox connectors' URLs are made from
/// it; `notaurl` was taken, and every call of theirs failed later). Shown without user info,
/// and not at all when it is no URL (checked here, not by clap, whose message shows the value).
fn sandbox_url(text: &str) -> Result<String, String> {
    match url::Url::parse(text.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            Ok(text.trim().to_string())
        }
        // Shown only when it parses with a host, its user info taken out: `user:pw@host` parses
        // as a scheme and an opaque path that would show the password.
        Ok(url) if url.host().is_some() => Err(format!(
            "`{}` is not an http(s) URL (e.g. http://127.0.0.1:4000)",
            crate::secret::url_without_credentials(text).unwrap_or_default()
        )),
        _ => Err("it is not a URL with a host (e.g. http://127.0.0.1:4000)".to_string()),
    }
}

pub fn run(cli: Cli) -> ExitCode {
    let workers = match &cli.command {
        Command::Serve(args) => args.workers,
        _ => None,
    };
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    if let Some(workers) = workers.filter(|n| *n > 1) {
        builder.worker_threads(usize::from(workers));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tokenwarden: could not start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let ran = runtime.block_on(async {
        let ran = run_command(cli.command).await;
        close_opened_stores().await;
        ran
    });
    match ran {
        Ok(code) => code,
        Err(message) => {
            eprintln!("tokenwarden: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run_command(command: Command) -> Result<ExitCode, String> {
    // Administrative commands log warnings and errors (to standard error; standard output stays
    // their JSON), so an internal fault says what it was.
    if !matches!(
        command,
        Command::Serve(_) | Command::Sandbox(_) | Command::Demo
    ) {
        crate::telemetry::init_with_default("warn");
    }
    match command {
        Command::Serve(args) => {
            crate::telemetry::init();
            let mut config = crate::app::AppConfig::new(args.database.database_url);
            config.master_key = args.database.master_key;
            config.previous_master_keys = args.database.previous_master_keys;
            config.ignore_missing_keys = args.database.ignore_missing_keys;
            config.sandbox_url = sandbox_url(&args.sandbox_url)
                .map_err(|why| format!("--sandbox-url / TOKENWARDEN_SANDBOX_URL: {why}"))?;
            config.refresh_concurrency = usize::from(args.refresh_concurrency);
            config.header_read_timeout =
                std::time::Duration::from_secs(u64::from(args.idle_timeout));
            config.proxy_timeout = std::time::Duration::from_secs(u64::from(args.proxy_timeout));
            config.shutdown_timeout =
                std::time::Duration::from_secs(u64::from(args.shutdown_timeout));
            config.database_pool_size = args.database_pool_size;
            config.max_connections = args.max_connections.map(|n| n as usize);
            let rate = args.refresh_rate;
            if !rate.is_finite() || rate < 0.0 || (rate > 0.0 && rate < MIN_REFRESH_RATE) {
                return Err(format!(
                    "--refresh-rate must be 0 (no limit) or at least {MIN_REFRESH_RATE} (one refresh per connector in 1,000 s)"
                ));
            }
            config.refresh_rate_per_connector = args.refresh_rate;
            config.outbound_proxy = args.outbound_proxy;
            config.egress = std::sync::Arc::new(crate::egress::Policy::parse(
                &args.egress_deny,
                &args.egress_allow,
            )?);
            config.event_retention =
                Duration::from_secs(u64::from(args.event_retention_days) * 86_400);
            config.metrics_token_hash = args
                .metrics_token
                .as_ref()
                .map(metrics_token_hash)
                .transpose()?;
            config.audit_retention = (args.audit_retention_days > 0)
                .then(|| Duration::from_secs(u64::from(args.audit_retention_days) * 86_400));
            crate::startup::serve(args.bind, config)
                .await
                .map_err(|error| error.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sandbox(args) => {
            crate::telemetry::init();
            let client = match args.client {
                Some(pair) => Some(
                    pair.split_once(':')
                        .map(|(id, secret)| (id.to_string(), secret.to_string()))
                        .ok_or("--client takes ID:SECRET")?,
                ),
                None => None,
            };
            let config = tokenwarden_sandbox::SandboxConfig {
                client,
                ..Default::default()
            };
            let listener = crate::startup::listen(args.bind)
                .map_err(|error| format!("could not listen on {}: {error}", args.bind))?;
            eprintln!("tokenwarden sandbox listening on http://{}", args.bind);
            tokenwarden_sandbox::serve(listener, config, crate::startup::shutdown_signal())
                .await
                .map_err(|error| error.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => Ok(crate::demo::run().await),
        Command::Orgs {
            command: OrgsCommand::Create { name, database },
        } => {
            // Checked before the database is opened (created, on a first run).
            crate::orgs::organization_name(&name).map_err(|error| error.message)?;
            let app = open_app(database).await?;
            let created = crate::orgs::create_organization(&app, &name)
                .await
                .map_err(|error| error.message)?;
            print_json(&created)
        }
        Command::Orgs {
            command:
                OrgsCommand::RotateSecret {
                    organization_id,
                    database,
                },
        } => {
            existing_database(&database)?;
            let app = open_app(database).await?;
            let rotated = crate::orgs::rotate_organization_secret(&app, organization_id)
                .await
                .map_err(|error| error.message)?;
            print_json(&rotated)
        }
        Command::Users {
            command:
                UsersCommand::List {
                    organization_id,
                    database,
                },
        } => {
            existing_database(&database)?;
            let app = open_app(database).await?;
            let users = crate::orgs::list_users(&app, organization_id)
                .await
                .map_err(|error| error.message)?;
            print_json(&users)
        }
        Command::Users {
            command:
                UsersCommand::RotateSecret {
                    organization_id,
                    user_id,
                    database,
                },
        } => {
            existing_database(&database)?;
            let app = open_app(database).await?;
            let rotated = crate::orgs::rotate_user_secret(&app, organization_id, user_id)
                .await
                .map_err(|error| error.message)?;
            print_json(&rotated)
        }
        Command::Users {
            command:
                UsersCommand::Delete {
                    organization_id,
                    user_id,
                    database,
                },
        } => {
            existing_database(&database)?;
            let app = open_app(database).await?;
            crate::orgs::delete_user(&app, organization_id, user_id)
                .await
                .map_err(|error| error.message)?;
            print_json(
                &serde_json::json!({"deleted": true, "organizationId": organization_id, "userId": user_id}),
            )
        }
        Command::Users {
            command:
                UsersCommand::Create {
                    organization_id,
                    name,
                    database,
                },
        } => {
            existing_database(&database)?;
            let app = open_app(database).await?;
            let created = crate::orgs::create_user(&app, organization_id, &name)
                .await
                .map_err(|error| error.message)?;
            print_json(&created)
        }
        Command::Instances { remote, command } => {
            use crate::remote::InstanceAction;
            let remote = remote_of(remote);
            match command {
                InstancesCommand::List => remote.list_instances().await?,
                InstancesCommand::Show { id } => remote.show_instance(id).await?,
                InstancesCommand::Refresh { id } => remote.act(id, InstanceAction::Refresh).await?,
                InstancesCommand::Revoke { id } => remote.act(id, InstanceAction::Revoke).await?,
                InstancesCommand::Enable { id } => remote.act(id, InstanceAction::Enable).await?,
                InstancesCommand::Disable { id } => remote.act(id, InstanceAction::Disable).await?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Connectors {
            remote,
            command: ConnectorsCommand::List { category },
        } => {
            remote_of(remote)
                .list_connectors(category.as_deref())
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Database {
            command: DatabaseCommand::Copy(args),
        } => copy_database(args).await,
        Command::Database {
            command: DatabaseCommand::Reopen { database },
        } => {
            existing_database(&database)?;
            crate::store::Store::check_url(&database.database_url).map_err(|e| e.to_string())?;
            let store = crate::store::Store::connect(&database.database_url)
                .await
                .map_err(|error| error.to_string())?;
            let was = store.copied_to().await.map_err(|e| e.to_string())?;
            store.unmark_copied().await.map_err(|e| e.to_string())?;
            outln!(
                "{}",
                serde_json::json!({"reopened": was.is_some(), "wasCopiedTo": was.map(|(target, _)| target)})
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            command: KeysCommand::Rotate { database, force },
        } => {
            existing_database(&database)?;
            let app = open_app(database).await?;
            // A replica sealing under another key would seal again under it what this
            // re-seals, as its refreshes commit: the rotation ended "100 %" with the used
            // instances back under the old key, and a replica then started with the new key
            // alone could not read them.
            let key = app.keyring.current_key_id();
            let others = app
                .store
                .replicas_sealing_otherwise(
                    crate::app::now_ms() - crate::store::copy::REPLICA_SEEN_WITHIN_MS,
                    &key,
                )
                .await
                .map_err(|error| error.to_string())?;
            if !others.is_empty() && !force {
                let named: Vec<String> = others
                    .iter()
                    .map(|(id, _, sealing)| {
                        format!(
                            "{id} (key {})",
                            sealing.as_deref().unwrap_or("not said: an older release")
                        )
                    })
                    .collect();
                return Err(format!(
                    "{} running replica(s) seal under another master key than this command's ({key}): {}. Restart every replica with the new key as TOKENWARDEN_MASTER_KEY and the old one in TOKENWARDEN_PREVIOUS_MASTER_KEYS (the second round), then run this again; --force runs it anyway (a replica killed in the last minute is still listed)",
                    others.len(),
                    named.join(", ")
                ));
            }
            let resealed = crate::orgs::rotate_keys(&app)
                .await
                .map_err(|error| error.message)?;
            eprintln!(
                "re-encrypted {} rows under key {}",
                resealed.changed,
                app.keyring.current_key_id()
            );
            if resealed.unreadable.is_empty() {
                return Ok(ExitCode::SUCCESS);
            }
            // Everything else is done; these need a person (exit 2: not a failed rotation).
            eprintln!(
                "{} row(s) open with none of the keys given and were left as they are, all their values under their old keys: {} (altered, or sealed under a key no longer configured: give that key in TOKENWARDEN_PREVIOUS_MASTER_KEYS and rotate again, or delete the instances; keep the old key until then)",
                resealed.unreadable.len(),
                resealed.unreadable.join(", ")
            );
            Ok(ExitCode::from(2))
        }
    }
}

/// `tokenwarden database copy`: the source opened as every command opens it (its key checked),
/// the key file given to a SQLite copy, the rows copied, and what to start the copy with.
async fn copy_database(args: CopyArgs) -> Result<ExitCode, String> {
    let to = args.to.trim().to_string();
    crate::store::Store::check_url(&to).map_err(|error| format!("--to: {error}"))?;
    if crate::store::sqlite_in_memory(&to) {
        return Err(
            "--to: an in-memory database ends with this command: give sqlite://path or postgres://…"
                .to_string(),
        );
    }
    existing_database(&args.database)?;
    let source_url = args.database.database_url.trim().to_string();
    let same_file = match (
        crate::store::sqlite_file(&source_url),
        crate::store::sqlite_file(&to),
    ) {
        (Some(source), Some(target)) => {
            let canonical = |file: &str| std::fs::canonicalize(file).ok();
            source == target
                || (canonical(&source).is_some() && canonical(&source) == canonical(&target))
        }
        _ => false,
    };
    if same_file || source_url == to {
        return Err("--to names the source database: give another one".to_string());
    }
    let shown_to = crate::secret::url_without_credentials(&to)
        .unwrap_or_else(|| "the target database".to_string());
    let key_given = args
        .database
        .master_key
        .as_deref()
        .is_some_and(|key| !key.trim().is_empty());
    let previous_given = args
        .database
        .previous_master_keys
        .as_deref()
        .is_some_and(|keys| !keys.trim().is_empty());
    // A source marked as copied is opened (to say so, below), not started.
    let app =
        open_app_adjusted(args.database, |config| config.opening_copied_source = true).await?;
    // A source copied before stays with that copy: a second would be another live copy of the
    // same grants.
    if let Some((target, at)) = app.store.copied_to().await.map_err(|e| e.to_string())? {
        return Err(format!(
            "this database was copied to {target} at {} already: if that copy is abandoned, run `tokenwarden database reopen` on this database first",
            crate::instances::iso8601(at)
        ));
    }
    // The source's key, where it is in a file, goes beside a SQLite copy.
    let source_key_file = (!key_given)
        .then(|| crate::crypto::key_file_of(&source_url))
        .flatten();
    let mut key_file_written = None;
    if let (Some(from), Some(target_key_file)) = (&source_key_file, crate::crypto::key_file_of(&to))
        && crate::crypto::copy_key_file(from, &target_key_file)
            .map_err(|error| error.to_string())?
    {
        key_file_written = Some(target_key_file);
    }
    let copied = async {
        let target = crate::store::Store::connect(&to)
            .await
            .map_err(|error| format!("--to: {error}"))?;
        crate::store::copy::copy_database(&app.store, &target, &shown_to, |_, _| {})
            .await
            .map_err(|error| error.to_string())
    }
    .await;
    let copied = match copied {
        Ok(copied) => copied,
        Err(error) => {
            // The key file made for the copy goes with it: beside a database that holds
            // something else, it would stand for that database's key.
            if let Some(written) = &key_file_written {
                let _ = std::fs::remove_file(written);
            }
            return Err(error);
        }
    };
    let rows: serde_json::Map<String, serde_json::Value> = copied
        .0
        .iter()
        .map(|(table, rows)| (table.clone(), serde_json::Value::from(*rows)))
        .collect();
    outln!("{}", serde_json::json!({"to": shown_to, "copied": rows}));
    let key = match (&source_key_file, &key_file_written) {
        (_, Some(written)) => format!("its key file {} holds the source's key", written.display()),
        (Some(from), None) if crate::store::sqlite_file(&to).is_some() => {
            format!(
                "its key file holds the source's key (the one in {})",
                from.display()
            )
        }
        (Some(from), None) => format!(
            "set TOKENWARDEN_MASTER_KEY on every replica to the key in {} (base64, as it is in the file)",
            from.display()
        ),
        (None, _) => "give it the same TOKENWARDEN_MASTER_KEY".to_string(),
    };
    let previous = if previous_given {
        ", and the same TOKENWARDEN_PREVIOUS_MASTER_KEYS until `tokenwarden keys rotate` has run on it"
    } else {
        ""
    };
    eprintln!(
        "Start the service on the copy: {key}{previous}. The source is marked as copied: \
         `serve` refuses it from now on (`tokenwarden database reopen` undoes that if the copy \
         is abandoned)."
    );
    Ok(ExitCode::SUCCESS)
}

fn remote_of(args: RemoteArgs) -> crate::remote::Remote {
    crate::remote::Remote {
        url: args.url,
        user_secret: args.user_secret,
        organization_secret: args.org_secret,
        json: args.json,
    }
}

/// A command that works on what a database holds refuses a SQLite file that is not there: a
/// mistyped path made a new database (and its key file), and `keys rotate` said it had
/// re-encrypted 0 rows and succeeded.
fn existing_database(database: &DatabaseArgs) -> Result<(), String> {
    match crate::store::sqlite_file(&database.database_url) {
        Some(file) if !std::path::Path::new(&file).exists() => Err(format!(
            "there is no database at {file}: give the database `serve` uses"
        )),
        _ => Ok(()),
    }
}

/// Prints `value` as one line of JSON: a command's answer.
fn print_json(value: &impl serde::Serialize) -> Result<ExitCode, String> {
    outln!(
        "{}",
        serde_json::to_string(value).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

/// The stores the command opened, closed at its end: SQLite writes its log into the file and
/// removes it when the last connection closes (a process that ends without closing leaves
/// `-wal` and `-shm` beside the file, which a copy of the file alone lacks).
static OPENED_STORES: std::sync::Mutex<Vec<crate::store::Store>> =
    std::sync::Mutex::new(Vec::new());

async fn close_opened_stores() {
    let stores = std::mem::take(&mut *OPENED_STORES.lock().unwrap_or_else(|e| e.into_inner()));
    for store in stores {
        store.close_within(std::time::Duration::from_secs(5)).await;
    }
}

async fn open_app(database: DatabaseArgs) -> Result<crate::app::SharedApp, String> {
    open_app_adjusted(database, |_| {}).await
}

async fn open_app_adjusted(
    database: DatabaseArgs,
    adjust: impl FnOnce(&mut crate::app::AppConfig),
) -> Result<crate::app::SharedApp, String> {
    // What an administrative command writes would end with it: its secrets printed for an
    // organization that no longer exists.
    if crate::store::sqlite_in_memory(&database.database_url) {
        return Err(
            "an in-memory database ends with this command: give the database `serve` uses"
                .to_string(),
        );
    }
    let mut config = crate::app::AppConfig::new(database.database_url);
    config.master_key = database.master_key;
    config.previous_master_keys = database.previous_master_keys;
    config.ignore_missing_keys = database.ignore_missing_keys;
    config.background_tasks = false;
    adjust(&mut config);
    let app = crate::app::App::build(config)
        .await
        .map_err(|error| error.to_string())?;
    OPENED_STORES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(app.store.clone());
    Ok(app)
}
