//! Organizations and their users: creation (secrets made here, only their hashes stored), the
//! check of the platform `Authorization` header, and master-key rotation.

use serde::Serialize;

use crate::app::App;
use crate::crypto::{self, Binding};
use crate::http::error::ApiError;
use crate::store::{NewOrganization, NewUser};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedOrganization {
    pub organization_secret: String,
    pub user_secret: String,
    pub organization_id: i64,
    pub user_id: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedUser {
    pub user_secret: String,
    pub organization_id: i64,
    pub user_id: i64,
}

impl std::fmt::Debug for CreatedOrganization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedOrganization")
            .field("organization_secret", &"[redacted]")
            .field("user_secret", &"[redacted]")
            .field("organization_id", &self.organization_id)
            .field("user_id", &self.user_id)
            .finish()
    }
}

impl std::fmt::Debug for CreatedUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedUser")
            .field("user_secret", &"[redacted]")
            .field("organization_id", &self.organization_id)
            .field("user_id", &self.user_id)
            .finish()
    }
}

/// An organization's name as it is kept: 1 to 200 characters, no control character (a line
/// break would forge lines where the name is shown: logs, the CLI's output).
pub fn organization_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "An organization needs a name of 1 to 200 characters, without control characters",
        ));
    }
    Ok(name)
}

pub async fn create_organization(app: &App, name: &str) -> Result<CreatedOrganization, ApiError> {
    let name = organization_name(name)?;
    let organization_secret = crypto::new_platform_secret();
    let user_secret = crypto::new_platform_secret();
    let organization_id = crypto::new_id();
    let user_id = crypto::new_id();
    let webhook_secret = crypto::new_platform_secret();
    let webhook_secret_enc = app.keyring.seal_secret(
        &webhook_secret,
        Binding {
            table: "organizations",
            row: organization_id,
            field: "webhook_secret",
        },
    );
    app.store
        .create_organization(&NewOrganization {
            id: organization_id,
            name: name.to_string(),
            secret_hash: crypto::hash_secret(organization_secret.expose()),
            webhook_secret_enc,
            created_at: crate::app::now_ms(),
            first_user: NewUser {
                id: user_id,
                name: "owner".to_string(),
                secret_hash: crypto::hash_secret(user_secret.expose()),
            },
        })
        .await?;
    Ok(CreatedOrganization {
        organization_secret: organization_secret.expose().to_string(),
        user_secret: user_secret.expose().to_string(),
        organization_id,
        user_id,
    })
}

pub async fn create_user(
    app: &App,
    organization_id: i64,
    name: &str,
) -> Result<CreatedUser, ApiError> {
    if app.store.get_organization(organization_id).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "There is no organization {organization_id}"
        )));
    }
    let user_secret = crypto::new_platform_secret();
    let user_id = crypto::new_id();
    app.store
        .create_user(
            organization_id,
            &NewUser {
                id: user_id,
                name: name.trim().to_string(),
                secret_hash: crypto::hash_secret(user_secret.expose()),
            },
            crate::app::now_ms(),
        )
        .await?;
    Ok(CreatedUser {
        user_secret: user_secret.expose().to_string(),
        organization_id,
        user_id,
    })
}

/// A user as `users list` shows it: never its secret, which is kept only as a hash.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedUser {
    pub user_id: i64,
    pub name: String,
    pub created_at: String,
}

/// An organization's new secret (`orgs rotate-secret`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewOrganizationSecret {
    pub organization_secret: String,
    pub organization_id: i64,
}

impl std::fmt::Debug for NewOrganizationSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewOrganizationSecret")
            .field("organization_secret", &"[redacted]")
            .field("organization_id", &self.organization_id)
            .finish()
    }
}

async fn existing_organization(app: &App, organization_id: i64) -> Result<(), ApiError> {
    match app.store.get_organization(organization_id).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found(format!(
            "There is no organization {organization_id}"
        ))),
    }
}

fn no_such_user(organization_id: i64, user_id: i64) -> ApiError {
    ApiError::not_found(format!(
        "There is no user {user_id} in organization {organization_id}"
    ))
}

/// An organization's users (ids, names, when made).
pub async fn list_users(app: &App, organization_id: i64) -> Result<Vec<ListedUser>, ApiError> {
    existing_organization(app, organization_id).await?;
    let users = app.store.list_users(organization_id).await?;
    Ok(users
        .into_iter()
        .map(|user| ListedUser {
            user_id: user.id,
            name: user.name,
            created_at: crate::instances::iso8601(user.created_at),
        })
        .collect())
}

/// A new secret for a user (a leaked one, a user who left and whose secret others know): the
/// old one is refused from the next request on, on every replica.
pub async fn rotate_user_secret(
    app: &App,
    organization_id: i64,
    user_id: i64,
) -> Result<CreatedUser, ApiError> {
    existing_organization(app, organization_id).await?;
    let user_secret = crypto::new_platform_secret();
    if !app
        .store
        .replace_user_secret(
            organization_id,
            user_id,
            &crypto::hash_secret(user_secret.expose()),
        )
        .await?
    {
        return Err(no_such_user(organization_id, user_id));
    }
    let target = user_id.to_string();
    crate::audit::record_automatic(
        app,
        organization_id,
        "user.secret_rotated",
        Some(&target),
        Some("by the command line"),
    )
    .await;
    Ok(CreatedUser {
        user_secret: user_secret.expose().to_string(),
        organization_id,
        user_id,
    })
}

/// Deletes a user: its secret is refused from the next request on. Its audit entries stay.
/// Not the organization's last user: without one, it could make no platform call at all.
pub async fn delete_user(app: &App, organization_id: i64, user_id: i64) -> Result<(), ApiError> {
    existing_organization(app, organization_id).await?;
    let users = app.store.list_users(organization_id).await?;
    let Some(user) = users.iter().find(|user| user.id == user_id) else {
        return Err(no_such_user(organization_id, user_id));
    };
    if users.len() == 1 {
        return Err(ApiError::conflict(format!(
            "User {user_id} is the last user of organization {organization_id}, which could make no platform call without one: create another first (`users create`), or give this one a new secret (`users rotate-secret`)"
        )));
    }
    if !app.store.delete_user(organization_id, user_id).await? {
        return Err(no_such_user(organization_id, user_id));
    }
    let (target, detail) = (
        user_id.to_string(),
        format!("by the command line; the user's name was {:?}", user.name),
    );
    crate::audit::record_automatic(
        app,
        organization_id,
        "user.deleted",
        Some(&target),
        Some(&detail),
    )
    .await;
    Ok(())
}

/// A new secret for the organization: the old one is refused from the next request on.
pub async fn rotate_organization_secret(
    app: &App,
    organization_id: i64,
) -> Result<NewOrganizationSecret, ApiError> {
    let organization_secret = crypto::new_platform_secret();
    if !app
        .store
        .replace_organization_secret(
            organization_id,
            &crypto::hash_secret(organization_secret.expose()),
        )
        .await?
    {
        return Err(ApiError::not_found(format!(
            "There is no organization {organization_id}"
        )));
    }
    crate::audit::record_automatic(
        app,
        organization_id,
        "organization.secret_rotated",
        None,
        Some("by the command line"),
    )
    .await;
    Ok(NewOrganizationSecret {
        organization_secret: organization_secret.expose().to_string(),
        organization_id,
    })
}

/// Re-seals every encrypted value that is not under the current key, in batches, while the
/// service runs. Answers how many rows changed, and the rows no key opens.
pub async fn rotate_keys(app: &App) -> Result<crate::instances::Resealed, ApiError> {
    let total: i64 = app
        .store
        .count_instances_by_state()
        .await?
        .iter()
        .map(|(_, count)| count)
        .sum();
    let mut bar = ProgressBar::new(total.max(0) as u64, "instances re-sealed");
    let resealed = crate::instances::reseal_all(app, &mut |seen| bar.advance(seen)).await?;
    bar.finish();
    Ok(resealed)
}

/// A progress bar on standard error: redrawn in place on a terminal, a line every tenth
/// otherwise (logs and CI).
struct ProgressBar {
    total: u64,
    done: u64,
    label: &'static str,
    terminal: bool,
    last_tenth: u64,
}

impl ProgressBar {
    fn new(total: u64, label: &'static str) -> Self {
        use std::io::IsTerminal;
        ProgressBar {
            total,
            done: 0,
            label,
            terminal: std::io::stderr().is_terminal(),
            last_tenth: 0,
        }
    }

    fn advance(&mut self, by: u64) {
        self.done += by;
        let fraction = if self.total == 0 {
            1.0
        } else {
            (self.done as f64 / self.total as f64).min(1.0)
        };
        if self.terminal {
            let filled = (fraction * 30.0).round() as usize;
            eprint!(
                "\r[{}{}] {}/{} {}",
                "#".repeat(filled),
                " ".repeat(30 - filled),
                self.done,
                self.total,
                self.label
            );
        } else {
            let tenth = (fraction * 10.0).floor() as u64;
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                eprintln!(
                    "{}% ({}/{}) {}",
                    tenth * 10,
                    self.done,
                    self.total,
                    self.label
                );
            }
        }
    }

    fn finish(&mut self) {
        if self.terminal {
            eprintln!();
        }
    }
}
