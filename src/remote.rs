//! The command line's client side: `tokenwarden instances …` and `tokenwarden connectors list`
//! speak to a running server over its platform API (`--url` / `TOKENWARDEN_URL`, secrets from
//! `TOKENWARDEN_USER_SECRET` and `TOKENWARDEN_ORG_SECRET`), and print a table or `--json`.

use serde_json::Value;

pub struct Remote {
    pub url: String,
    pub user_secret: String,
    pub organization_secret: String,
    pub json: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum InstanceAction {
    Refresh,
    Revoke,
    Enable,
    Disable,
}

impl Remote {
    /// A client for the service's own API: unlike the service's clients, it follows
    /// `HTTP(S)_PROXY` like any command-line tool (the service may be reached through one).
    fn client(&self) -> Result<reqwest::Client, String> {
        crate::app::install_crypto_provider();
        let mut builder = reqwest::Client::builder();
        // A service on this machine is reached directly, whatever the environment's proxy.
        let loopback = url::Url::parse(&self.url)
            .ok()
            .is_some_and(|url| match url.host() {
                Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            });
        if loopback {
            builder = builder.no_proxy();
        }
        builder
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("tokenwarden-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| error.to_string())
    }

    async fn request(&self, method: reqwest::Method, path: &str) -> Result<Value, String> {
        if self.user_secret.is_empty() || self.organization_secret.is_empty() {
            return Err("set TOKENWARDEN_USER_SECRET and TOKENWARDEN_ORG_SECRET (printed by `tokenwarden orgs create`)".into());
        }
        // The platform API's base path is added here; a URL given with it (the README's `$API`)
        // is taken as the server's.
        let base = self.url.trim().trim_end_matches('/');
        let base = base.strip_suffix("/elements/api-v2").unwrap_or(base);
        match url::Url::parse(base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(format!(
                    "--url / TOKENWARDEN_URL `{}` is not an http(s) URL of the server (e.g. http://127.0.0.1:8080)",
                    escaped(
                        &crate::secret::url_without_credentials(base)
                            .unwrap_or_else(|| base.to_string())
                    )
                ));
            }
        }
        let url = format!("{base}/elements/api-v2{path}");
        let response = self
            .client()?
            .request(method, &url)
            .header(
                "authorization",
                format!("User {}, Organization {}", self.user_secret, self.organization_secret),
            )
            .send()
            .await
            .map_err(|error| {
                format!(
                    "the server at {} does not answer ({}); is `tokenwarden serve` running, and is --url / TOKENWARDEN_URL right?",
                    escaped(&crate::secret::url_without_credentials(base).unwrap_or_else(|| base.to_string())),
                    crate::oauth::transport_message(&error)
                )
            })?;
        let status = response.status();
        let answer = response.text().await.map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_str(&answer).unwrap_or(Value::String(answer));
        if status.is_success() {
            return Ok(body);
        }
        // Shown as the tables show values: escaped.
        let message = escaped(body["message"].as_str().unwrap_or("no message"));
        let provider = body["providerMessage"]
            .as_str()
            .map(|p| format!(" (provider: {})", escaped(p)))
            .unwrap_or_default();
        // A 401 with the provider's words is about the instance's grant, not our secrets.
        if status.as_u16() == 401 && provider.is_empty() {
            return Err(format!("the server refused the secrets: {message}"));
        }
        Err(format!("{status}: {message}{provider}"))
    }

    pub async fn list_instances(&self) -> Result<(), String> {
        let instances = self.request(reqwest::Method::GET, "/instances").await?;
        if self.json {
            outln!("{}", pretty_json(&instances));
            return Ok(());
        }
        let rows: Vec<Vec<String>> = instances
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|i| {
                vec![
                    i["id"].to_string(),
                    shortened(&text(&i["name"]), 40),
                    text(&i["element"]["key"]),
                    text(&i["state"]),
                    text(&i["lastRefreshDate"]),
                    text(&i["accessTokenExpiresDate"]),
                    shortened(&reason(i), 60),
                ]
            })
            .collect();
        print_table(
            &[
                "ID",
                "NAME",
                "CONNECTOR",
                "STATE",
                "LAST REFRESH",
                "ACCESS EXPIRES",
                "REASON",
            ],
            &rows,
        );
        Ok(())
    }

    pub async fn show_instance(&self, id: i64) -> Result<(), String> {
        let instance = self
            .request(reqwest::Method::GET, &format!("/instances/{id}"))
            .await?;
        if self.json {
            outln!("{}", pretty_json(&instance));
            return Ok(());
        }
        let mut rows = Vec::new();
        for key in [
            "id",
            "name",
            "state",
            "valid",
            "disabled",
            "stateReason",
            "providerMessage",
            "refreshFailingSince",
            "lastRefreshFailure",
            "lastRefreshDate",
            "accessTokenExpiresDate",
            "refreshTokenExpiresDate",
            "createdDate",
            "updatedDate",
        ] {
            rows.push(vec![key.to_string(), text(&instance[key])]);
        }
        rows.push(vec!["connector".into(), text(&instance["element"]["key"])]);
        rows.push(vec!["tags".into(), escaped(&instance["tags"].to_string())]);
        if let Some(configuration) = instance["configuration"].as_object() {
            for (key, value) in configuration {
                rows.push(vec![escaped(key), text(value)]);
            }
        }
        print_table(&["FIELD", "VALUE"], &rows);
        Ok(())
    }

    pub async fn act(&self, id: i64, action: InstanceAction) -> Result<(), String> {
        let (method, path) = match action {
            InstanceAction::Refresh => (
                reqwest::Method::POST,
                format!("/instances/{id}/tokens/refresh"),
            ),
            InstanceAction::Revoke => (
                reqwest::Method::POST,
                format!("/instances/{id}/tokens/revoke"),
            ),
            InstanceAction::Enable => (reqwest::Method::PUT, format!("/instances/{id}/enabled")),
            InstanceAction::Disable => {
                (reqwest::Method::DELETE, format!("/instances/{id}/enabled"))
            }
        };
        let instance = self.request(method, &path).await?;
        if self.json {
            outln!("{}", pretty_json(&instance));
        } else if instance["revocation"]["revokedAtProvider"] == false {
            // Invalid here, alive at the provider (no revocation endpoint): an operator
            // revoking a leaked connection must not take it for dead.
            let revocation = &instance["revocation"];
            let why = revocation["providerMessage"]
                .as_str()
                .or(revocation["message"].as_str())
                .unwrap_or("the provider did not confirm it");
            outln!(
                "instance {id}: {}; NOT revoked at the provider: {}",
                text(&instance["state"]),
                escaped(why)
            );
        } else {
            outln!("instance {id}: {}", text(&instance["state"]));
        }
        Ok(())
    }

    pub async fn list_connectors(&self, category: Option<&str>) -> Result<(), String> {
        let path = match category {
            Some(category) => format!(
                "/elements?category={}",
                url::form_urlencoded::byte_serialize(category.as_bytes()).collect::<String>()
            ),
            None => "/elements".to_string(),
        };
        let connectors = self.request(reqwest::Method::GET, &path).await?;
        // A category no connector has is a typo (`CRM` for `crm`): named, with the ones there are.
        if let Some(category) = category
            && !self.json
            && connectors.as_array().is_some_and(Vec::is_empty)
        {
            let all = self.request(reqwest::Method::GET, "/elements").await?;
            let mut categories: Vec<String> = all
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["category"].as_str().map(escaped))
                .collect();
            categories.sort();
            categories.dedup();
            return Err(format!(
                "no connector is in category `{}`; the categories are: {}",
                escaped(category),
                categories.join(", ")
            ));
        }
        if self.json {
            outln!("{}", pretty_json(&connectors));
            return Ok(());
        }
        let rows: Vec<Vec<String>> = connectors
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| {
                vec![
                    text(&c["key"]),
                    text(&c["name"]),
                    text(&c["category"]),
                    text(&c["refresh"]["strategy"]),
                ]
            })
            .collect();
        print_table(&["KEY", "NAME", "CATEGORY", "STRATEGY"], &rows);
        Ok(())
    }
}

/// Why an instance is in its state, for a table: the provider's words where it spoke, else why
/// refreshes are failing, else the state's reason.
fn reason(instance: &Value) -> String {
    ["providerMessage", "lastRefreshFailure", "stateReason"]
        .iter()
        .map(|key| &instance[*key])
        .find(|value| value.as_str().is_some_and(|text| !text.is_empty()))
        .map_or_else(|| text(&Value::Null), text)
}

/// `text` cut to `width` characters, an ellipsis marking the cut: one long name widened every
/// row of the table.
fn shortened(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A value as a table shows it: text with its control characters escaped (`\u{1b}`), since a
/// tenant, or a provider, writes the values a terminal would otherwise obey; so are the
/// characters that only change how the rest shows (bidirectional overrides, zero-width ones)
/// and the line and paragraph separators.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "—".to_string(),
        Value::String(text) => escaped(text),
        other => other.to_string(),
    }
}

/// Whether `c` is escaped before it reaches a terminal: control characters (DEL and C1 among
/// them), invisible and bidirectional ones, and the line and paragraph separators.
fn unsafe_for_terminal(c: char) -> bool {
    c.is_control() || crate::oauth::invisible(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `text` with the characters [`text`] escapes escaped.
fn escaped(text: &str) -> String {
    text.chars()
        .map(|c| {
            if unsafe_for_terminal(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `value` as pretty JSON that is safe on a terminal and means the same: serde escapes the
/// control characters below U+0020 but writes DEL, C1 and bidirectional characters as they
/// are; these can only be inside strings, where `\uXXXX` stands for them.
fn pretty_json(value: &Value) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        // Below U+0020 only the layout's own newlines are left: serde escaped the rest.
        if c >= ' ' && unsafe_for_terminal(c) {
            for unit in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            widths[index] = widths[index].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(index, cell)| format!("{cell:<width$}", width = widths[index]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    outln!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        outln!("{}", line(row.clone()));
    }
    if rows.is_empty() {
        outln!("(none)");
    }
}
