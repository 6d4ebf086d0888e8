//! The store on both engines: every API, organization isolation, leases, compare-and-swap,
//! the outbox in the same transaction, and concurrent claims.

use std::collections::HashSet;

use tokenwarden::store::{
    ConnectorDeletion, DeliveryOutcome, DeliveryState, EncryptedInstanceFields, Engine,
    EventCursor, EventFilter, InstanceRow, InstanceState, NewAudit, NewEvent, NewOrganization,
    NewUser, OAuthStateRow, Reauthentication, RowVersion, Store, StoreError, TokenUpdate,
};

use crate::support::{drop_test_database, random_id, test_stores};

const NOW: i64 = 1_700_000_000_000;

fn bytes(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// Creates an organization with one user; returns the organization's id.
async fn organization(store: &Store, name: &str) -> i64 {
    let id = random_id();
    store
        .create_organization(&NewOrganization {
            id,
            name: name.to_string(),
            secret_hash: bytes(&format!("org-hash-{id}")),
            webhook_secret_enc: bytes("webhook-ciphertext"),
            created_at: NOW,
            first_user: NewUser {
                id: random_id(),
                name: format!("{name} admin"),
                secret_hash: bytes(&format!("user-hash-{id}")),
            },
        })
        .await
        .expect("create organization");
    id
}

fn instance(organization_id: i64, name: &str) -> InstanceRow {
    let id = random_id();
    InstanceRow {
        access_token_enc: Some(bytes("access-1")),
        refresh_token_enc: Some(bytes("refresh-1")),
        ..InstanceRow::new(
            id,
            organization_id,
            "sandbox-generic",
            name,
            bytes(&format!("token-hash-{id}")),
            bytes(&format!("token-enc-{id}")),
            NOW,
        )
    }
}

fn event(organization_id: i64, instance_id: i64, event_type: &str, at: i64) -> NewEvent {
    NewEvent {
        id: uuid::Uuid::new_v4().to_string(),
        organization_id,
        instance_id: Some(instance_id),
        element_key: Some("sandbox-generic".to_string()),
        event_type: event_type.to_string(),
        reason: None,
        occurred_at: at,
        payload: format!(r#"{{"type":"{event_type}","instanceId":{instance_id}}}"#),
        delivery_state: DeliveryState::None,
        next_attempt_at: None,
    }
}

async fn events_of(store: &Store, organization_id: i64, instance_id: i64) -> Vec<String> {
    store
        .list_events(
            organization_id,
            &EventFilter {
                instance_id: Some(instance_id),
                limit: 100,
                ..EventFilter::default()
            },
        )
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.event_type)
        .collect()
}

#[tokio::test]
async fn engines_connect_migrate_and_reconnect() {
    for test in test_stores().await {
        let expected = if test.label == "sqlite" {
            Engine::Sqlite
        } else {
            Engine::Postgres
        };
        assert_eq!(test.store.engine(), expected);
        test.store.ping().await.unwrap();
        // A second connection to a migrated database runs the migrations again as a no-op.
        let again = Store::connect(&test.url).await.unwrap();
        assert_eq!(again.next_due_time().await.unwrap(), None);
        again.close().await;
        test.cleanup().await;
    }
    assert!(matches!(
        Store::connect("mysql://localhost/x").await,
        Err(StoreError::Database(_))
    ));
}

#[tokio::test]
async fn organizations_and_users() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "Acme").await;

        let found = store
            .find_organization_by_secret_hash(&bytes(&format!("org-hash-{org}")))
            .await
            .unwrap()
            .expect(label);
        assert_eq!((found.id, found.name.as_str()), (org, "Acme"));
        assert_eq!(found.webhook_secret_enc, bytes("webhook-ciphertext"));
        assert_eq!(store.get_organization(org).await.unwrap(), Some(found));
        assert_eq!(store.get_organization(random_id()).await.unwrap(), None);

        let user = store
            .find_user_by_secret_hash(&bytes(&format!("user-hash-{org}")))
            .await
            .unwrap()
            .expect(label);
        assert_eq!(user.organization_id, org);
        assert_eq!(user.name, "Acme admin");
        assert!(
            store
                .find_user_by_secret_hash(b"nope")
                .await
                .unwrap()
                .is_none()
        );

        let second = NewUser {
            id: random_id(),
            name: "second".to_string(),
            secret_hash: bytes("second-user"),
        };
        store.create_user(org, &second, NOW).await.unwrap();
        assert_eq!(
            store
                .find_user_by_secret_hash(b"second-user")
                .await
                .unwrap()
                .unwrap()
                .id,
            second.id
        );
        // The same secret hash twice is a conflict; an unknown organization is not found.
        let duplicate = NewUser {
            id: random_id(),
            ..second.clone()
        };
        assert!(
            matches!(
                store.create_user(org, &duplicate, NOW).await,
                Err(StoreError::Conflict(_))
            ),
            "{label}"
        );
        let orphan = NewUser {
            id: random_id(),
            name: "orphan".to_string(),
            secret_hash: bytes("orphan"),
        };
        assert!(
            matches!(
                store.create_user(random_id(), &orphan, NOW).await,
                Err(StoreError::NotFound)
            ),
            "{label}"
        );

        // The organization and its first user are one transaction: a conflicting first user
        // leaves no organization behind.
        let id = random_id();
        let result = store
            .create_organization(&NewOrganization {
                id,
                name: "Half".to_string(),
                secret_hash: bytes("half-org"),
                webhook_secret_enc: bytes("w"),
                created_at: NOW,
                first_user: NewUser {
                    id: random_id(),
                    name: "dup".to_string(),
                    secret_hash: bytes("second-user"),
                },
            })
            .await;
        assert!(matches!(result, Err(StoreError::Conflict(_))), "{label}");
        assert_eq!(store.get_organization(id).await.unwrap(), None, "{label}");

        assert!(
            store
                .update_organization_webhook_secret(org, b"rotated")
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .get_organization(org)
                .await
                .unwrap()
                .unwrap()
                .webhook_secret_enc,
            bytes("rotated")
        );
        assert_eq!(store.list_organizations().await.unwrap().len(), 1);
        test.cleanup().await;
    }
}

#[tokio::test]
async fn connectors_are_per_organization() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let other = organization(store, "B").await;
        store
            .insert_connector(org, "acme", r#"{"key":"acme"}"#, NOW)
            .await
            .unwrap();
        store
            .insert_connector(org, "beta", r#"{"key":"beta"}"#, NOW)
            .await
            .unwrap();
        assert!(
            matches!(
                store.insert_connector(org, "acme", "{}", NOW).await,
                Err(StoreError::Conflict(_))
            ),
            "{label}"
        );
        // Another organization may use the same key.
        store
            .insert_connector(other, "acme", "{}", NOW)
            .await
            .unwrap();

        let keys: Vec<String> = store
            .list_connectors(org)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.key)
            .collect();
        assert_eq!(keys, ["acme", "beta"]);
        let acme = store.get_connector(org, "acme").await.unwrap().unwrap();
        assert_eq!(acme.definition, r#"{"key":"acme"}"#);
        assert!(store.get_connector(org, "nope").await.unwrap().is_none());

        assert!(
            store
                .update_connector(org, "acme", r#"{"v":2}"#, NOW + 1)
                .await
                .unwrap()
        );
        let updated = store.get_connector(org, "acme").await.unwrap().unwrap();
        assert_eq!(
            (updated.definition.as_str(), updated.updated_at),
            (r#"{"v":2}"#, NOW + 1)
        );

        // An instance of it keeps it; its creation, finishing after a deletion, does not
        // leave an instance of a connector that is gone.
        let mut used = instance(org, "user");
        used.element_key = "acme".into();
        assert!(
            store
                .insert_instance_of(&used, None, true, None)
                .await
                .unwrap()
        );
        assert_eq!(
            store.delete_connector(org, "acme").await.unwrap(),
            ConnectorDeletion::InUse(1)
        );
        assert!(store.delete_instance(org, used.id, None).await.unwrap());
        assert_eq!(
            store.delete_connector(org, "acme").await.unwrap(),
            ConnectorDeletion::Deleted
        );
        assert_eq!(
            store.delete_connector(org, "acme").await.unwrap(),
            ConnectorDeletion::NotFound
        );
        let mut late = instance(org, "late");
        late.element_key = "acme".into();
        assert!(
            !store
                .insert_instance_of(&late, None, true, None)
                .await
                .unwrap()
        );
        assert!(store.get_instance(org, late.id).await.unwrap().is_none());
        assert_eq!(
            store
                .get_connector(other, "acme")
                .await
                .unwrap()
                .unwrap()
                .definition,
            "{}"
        );
        test.cleanup().await;
    }
}

/// Replicas read one clock, the database's: a machine whose clock is 30 s ahead measures the
/// database 30 s behind it (the service then adds that to its own time). SQLite's clock is
/// the machine's.
#[tokio::test]
async fn the_database_clock_is_measured() {
    for test in test_stores().await {
        let ahead = || tokenwarden::app::system_now_ms() + 30_000;
        let offset = test.store.clock_offset_ms(ahead).await.unwrap();
        if test.label == "sqlite" {
            assert_eq!(offset, None);
        } else {
            let offset = offset.expect("PostgreSQL's clock is read");
            assert!(
                (-32_000..=-28_000).contains(&offset),
                "[{}] {offset} ms",
                test.label
            );
        }
        test.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oauth_states_are_single_use() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let state = |hash: &str, expires_at: i64| OAuthStateRow {
            state_hash: bytes(hash),
            organization_id: org,
            element_key: "sandbox-generic".to_string(),
            callback_url: "http://127.0.0.1/cb".to_string(),
            api_key: "client".to_string(),
            code_verifier_enc: Some(bytes("verifier")),
            scope: None,
            expires_at,
            api_secret_enc: Some(bytes("secret")),
        };
        store
            .insert_oauth_state(&state("s1", NOW + 600_000))
            .await
            .unwrap();
        assert!(
            matches!(
                store.insert_oauth_state(&state("s1", NOW)).await,
                Err(StoreError::Conflict(_))
            ),
            "{label}"
        );
        let taken = store
            .take_oauth_state(b"s1", NOW)
            .await
            .unwrap()
            .expect(label);
        assert_eq!(taken, state("s1", NOW + 600_000));
        assert!(store.take_oauth_state(b"s1", NOW).await.unwrap().is_none());

        // An expired state cannot be taken, and the purge removes it.
        store
            .insert_oauth_state(&state("old", NOW - 1))
            .await
            .unwrap();
        store
            .insert_oauth_state(&state("fresh", NOW + 1_000))
            .await
            .unwrap();
        assert!(store.take_oauth_state(b"old", NOW).await.unwrap().is_none());
        // What an organization has pending, the expired aside, counted to a limit.
        let other = organization(store, "B").await;
        let mut others = state("theirs", NOW + 1_000);
        others.organization_id = other;
        store.insert_oauth_state(&others).await.unwrap();
        store
            .insert_oauth_state(&state("fresh too", NOW + 1_000))
            .await
            .unwrap();
        assert_eq!(
            store
                .count_pending_oauth_states(org, NOW, 10)
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            store.count_pending_oauth_states(org, NOW, 1).await.unwrap(),
            1
        );
        assert_eq!(
            store
                .count_pending_oauth_states(other, NOW, 10)
                .await
                .unwrap(),
            1
        );
        assert!(
            store
                .take_oauth_state(b"fresh too", NOW)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(store.purge_expired_oauth_states(NOW).await.unwrap(), 1);

        // Concurrent takers: exactly one wins.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.take_oauth_state(b"fresh", NOW).await.unwrap()
            }));
        }
        let mut winners = 0;
        for task in tasks {
            winners += usize::from(task.await.unwrap().is_some());
        }
        assert_eq!(winners, 1, "{label}");
        test.cleanup().await;
    }
}

#[tokio::test]
async fn instances_crud_and_isolation() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let other = organization(store, "B").await;

        let mut first = instance(org, "first");
        first.tags = r#"["qa","eu"]"#.to_string();
        first.configuration = r#"{"base.url":"http://x"}"#.to_string();
        first.client_secret_enc = Some(bytes("client-secret"));
        store.insert_instance(&first, None).await.unwrap();
        let mut second = instance(org, "second");
        second.tags = r#"["prod"]"#.to_string();
        second.created_at = NOW + 1;
        store.insert_instance(&second, None).await.unwrap();
        store
            .insert_instance(&instance(other, "theirs"), None)
            .await
            .unwrap();

        assert_eq!(
            store.get_instance(org, first.id).await.unwrap().as_ref(),
            Some(&first)
        );
        // Another organization's id is simply not found, for reads and writes.
        assert_eq!(
            store.get_instance(other, first.id).await.unwrap(),
            None,
            "{label}"
        );
        assert!(
            !store
                .set_disabled(other, first.id, true, None)
                .await
                .unwrap()
        );
        assert!(!store.delete_instance(other, first.id, None).await.unwrap());
        assert!(
            store
                .update_instance_metadata(other, first.id, "x", "[]", "{}", None, None, false)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .reauthenticate(other, first.id, &Reauthentication::default(), None)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store
                .get_instance_by_id(first.id)
                .await
                .unwrap()
                .unwrap()
                .name,
            "first"
        );
        assert_eq!(
            store
                .find_instance_by_token_hash(&first.token_hash)
                .await
                .unwrap()
                .unwrap()
                .id,
            first.id
        );
        assert!(
            store
                .find_instance_by_token_hash(b"nope")
                .await
                .unwrap()
                .is_none()
        );

        // Duplicate ids or Element token hashes are conflicts; an unknown organization is not
        // found.
        let mut clash = instance(org, "clash");
        clash.token_hash = first.token_hash.clone();
        assert!(matches!(
            store.insert_instance(&clash, None).await,
            Err(StoreError::Conflict(_))
        ));
        let mut clash = instance(org, "clash");
        clash.id = first.id;
        assert!(matches!(
            store.insert_instance(&clash, None).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store
                .insert_instance(&instance(random_id(), "orphan"), None)
                .await,
            Err(StoreError::NotFound)
        ));

        let names = |rows: Vec<InstanceRow>| rows.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(
            names(store.list_instances(org, &[]).await.unwrap()),
            ["first", "second"]
        );
        let tags = |list: &[&str]| list.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(store.list_instances(org, &tags(&["eu"])).await.unwrap()),
            ["first"]
        );
        assert_eq!(
            names(
                store
                    .list_instances(org, &tags(&["eu", "prod"]))
                    .await
                    .unwrap()
            ),
            ["first", "second"],
            "tags match ANY"
        );
        assert!(
            store
                .list_instances(org, &tags(&["none"]))
                .await
                .unwrap()
                .is_empty()
        );

        // Metadata: None keeps the client secret, Some(None) removes it.
        let updated = store
            .update_instance_metadata(
                org,
                first.id,
                "renamed",
                r#"["x"]"#,
                r#"{"k":"v"}"#,
                None,
                None,
                false,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                updated.name.as_str(),
                updated.tags.as_str(),
                updated.configuration.as_str()
            ),
            ("renamed", r#"["x"]"#, r#"{"k":"v"}"#)
        );
        assert_eq!(updated.client_secret_enc, Some(bytes("client-secret")));
        assert_eq!(updated.tag_list(), ["x"]);
        assert_eq!(
            updated.token_version, first.token_version,
            "metadata is not a token change"
        );
        let updated = store
            .update_instance_metadata(
                org,
                first.id,
                "renamed",
                "[]",
                "{}",
                Some(None),
                None,
                false,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.client_secret_enc, None);
        let updated = store
            .update_instance_metadata(
                org,
                first.id,
                "r",
                "[]",
                "{}",
                Some(Some(bytes("new"))),
                None,
                false,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.client_secret_enc, Some(bytes("new")));
        // With the token version it was computed at: written while that is still the version,
        // not once a refresh has moved it on.
        let current = updated.token_version;
        assert!(
            store
                .update_instance_metadata(
                    org,
                    first.id,
                    "stale",
                    "[]",
                    "{}",
                    None,
                    Some(RowVersion {
                        token_version: current - 1,
                        ..RowVersion::of(&updated)
                    }),
                    false
                )
                .await
                .unwrap()
                .is_none()
        );
        let read = RowVersion::of(&updated);
        let updated = store
            .update_instance_metadata(org, first.id, "fresh", "[]", "{}", None, Some(read), false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.name, "fresh");
        // Another update that read the row before this one (within the same millisecond even)
        // does not write over it: it reads again and merges into what is there.
        assert!(
            store
                .update_instance_metadata(
                    org,
                    first.id,
                    "lost",
                    "[]",
                    "{}",
                    None,
                    Some(read),
                    false
                )
                .await
                .unwrap()
                .is_none()
        );

        assert!(store.set_disabled(org, first.id, true, None).await.unwrap());
        assert!(
            store
                .get_instance(org, first.id)
                .await
                .unwrap()
                .unwrap()
                .is_disabled()
        );
        assert!(
            store
                .set_disabled(org, first.id, false, None)
                .await
                .unwrap()
        );
        assert!(
            !store
                .get_instance(org, first.id)
                .await
                .unwrap()
                .unwrap()
                .is_disabled()
        );

        let deleted = event(org, first.id, "instance.deleted", NOW);
        assert!(
            store
                .delete_instance(org, first.id, Some(&deleted))
                .await
                .unwrap()
        );
        assert!(store.get_instance(org, first.id).await.unwrap().is_none());
        assert!(!store.delete_instance(org, first.id, None).await.unwrap());
        assert_eq!(
            events_of(store, org, first.id).await,
            ["instance.deleted"],
            "{label}"
        );
        test.cleanup().await;
    }
}

#[tokio::test]
async fn refresh_lease() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let mut row = instance(org, "leased");
        row.next_due_at = Some(NOW);
        store.insert_instance(&row, None).await.unwrap();

        let taken = store
            .try_acquire_refresh_lease(row.id, "replica-a", NOW, NOW + 30_000, true)
            .await
            .unwrap()
            .expect(label);
        assert_eq!(taken.refresh_lease_owner.as_deref(), Some("replica-a"));
        assert_eq!(taken.refresh_lease_until, Some(NOW + 30_000));
        assert_eq!(taken.refresh_in_flight_since, Some(NOW));
        assert_eq!(
            taken.next_due_at,
            Some(NOW + 30_000),
            "a leased row is not due before its end"
        );
        assert_eq!(taken.refresh_token_enc, Some(bytes("refresh-1")));

        // A second taker fails while the lease runs, also at its very end.
        assert!(
            store
                .try_acquire_refresh_lease(row.id, "replica-b", NOW + 1_000, NOW + 31_000, true)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .try_acquire_refresh_lease(row.id, "replica-b", NOW + 30_000, NOW + 60_000, true)
                .await
                .unwrap()
                .is_none()
        );
        // A non-owner cannot release it.
        assert!(
            !store
                .release_refresh_lease(row.id, "replica-b")
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .get_instance_by_id(row.id)
                .await
                .unwrap()
                .unwrap()
                .refresh_lease_owner
                .as_deref(),
            Some("replica-a")
        );
        // An expired lease can be taken.
        let stolen = store
            .try_acquire_refresh_lease(row.id, "replica-b", NOW + 30_001, NOW + 60_000, true)
            .await
            .unwrap()
            .expect(label);
        assert_eq!(stolen.refresh_lease_owner.as_deref(), Some("replica-b"));
        // The former owner's release does nothing; the owner's clears lease and in-flight.
        assert!(
            !store
                .release_refresh_lease(row.id, "replica-a")
                .await
                .unwrap()
        );
        assert!(
            store
                .release_refresh_lease(row.id, "replica-b")
                .await
                .unwrap()
        );
        let released = store.get_instance_by_id(row.id).await.unwrap().unwrap();
        assert_eq!(
            (released.refresh_lease_owner, released.refresh_lease_until),
            (None, None)
        );
        assert_eq!(released.refresh_in_flight_since, None);
        // A hold (no refresh token presented) marks nothing in flight: crash recovery would
        // refresh what it left marked. It keeps the mark of a refresh that was interrupted.
        let held = store
            .try_acquire_refresh_lease(row.id, "replica-c", NOW + 60_001, NOW + 70_000, false)
            .await
            .unwrap()
            .expect(label);
        assert_eq!(held.refresh_lease_owner.as_deref(), Some("replica-c"));
        assert_eq!(held.refresh_in_flight_since, None, "{label}");
        store
            .release_refresh_lease(row.id, "replica-c")
            .await
            .unwrap();
        store
            .try_acquire_refresh_lease(row.id, "replica-a", NOW + 70_001, NOW + 80_000, true)
            .await
            .unwrap()
            .expect(label);
        let held = store
            .try_acquire_refresh_lease(row.id, "replica-c", NOW + 80_001, NOW + 90_000, false)
            .await
            .unwrap()
            .expect(label);
        assert_eq!(held.refresh_in_flight_since, Some(NOW + 70_001), "{label}");
        // The hold's end keeps that mark (the hold finished no refresh; a disable cleared
        // it), and clears one made while it held.
        assert!(
            store
                .release_hold(row.id, "replica-c", NOW + 80_001)
                .await
                .unwrap()
        );
        let after = store.get_instance_by_id(row.id).await.unwrap().unwrap();
        assert_eq!(after.refresh_lease_owner, None, "{label}");
        assert_eq!(after.refresh_in_flight_since, Some(NOW + 70_001), "{label}");
        store
            .try_acquire_refresh_lease(row.id, "replica-c", NOW + 90_001, NOW + 95_000, false)
            .await
            .unwrap()
            .expect(label);
        assert!(
            store
                .release_hold(row.id, "replica-c", NOW + 60_000)
                .await
                .unwrap()
        );
        let after = store.get_instance_by_id(row.id).await.unwrap().unwrap();
        assert_eq!(after.refresh_in_flight_since, None, "{label}");
        // Recovery's way to drop a mark with nothing to finish: only once nobody holds it.
        store
            .try_acquire_refresh_lease(row.id, "replica-a", NOW + 95_001, NOW + 99_000, true)
            .await
            .unwrap()
            .expect(label);
        assert!(
            !store
                .forget_interrupted(row.id, NOW + 98_000)
                .await
                .unwrap()
        );
        assert!(
            store
                .forget_interrupted(row.id, NOW + 99_001)
                .await
                .unwrap()
        );
        let after = store.get_instance_by_id(row.id).await.unwrap().unwrap();
        assert_eq!(after.refresh_in_flight_since, None, "{label}");
        store
            .release_refresh_lease(row.id, "replica-a")
            .await
            .unwrap();
        assert!(
            store
                .try_acquire_refresh_lease(random_id(), "x", NOW, NOW + 1, true)
                .await
                .unwrap()
                .is_none()
        );
        test.cleanup().await;
    }
}

/// Two ways one replica used to clear a lease another part of itself had just taken, leaving a
/// refresh running unleased, so that another replica could present the same refresh token:
/// a token import under a hold (`lease_held`) cleared the hold's lease, which this replica's
/// scheduler could claim before the hold's end cleared it again; and the scheduler giving a
/// claim back cleared it after a proxy flight of the same replica had taken it over.
/// Commits of refreshed tokens to a store that does not answer (here its pool closed) fail as
/// `Unavailable`, grouped or alone: the refresh keeps rotated tokens only for a store that is
/// down. A group of them on PostgreSQL failed as a generic database error, and its tokens were
/// dropped.
#[tokio::test]
async fn commits_to_a_store_that_does_not_answer_say_so() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let mut rows = Vec::new();
        for index in 0..8 {
            let row = instance(org, &format!("down-{index}"));
            store.insert_instance(&row, None).await.unwrap();
            rows.push(row);
        }
        store.close().await;
        let update = TokenUpdate {
            access_token_enc: Some(bytes("access-2")),
            ..TokenUpdate::default()
        };
        let commits = rows.iter().map(|row| {
            store.commit_refreshed_tokens_returning(
                row.id,
                "replica-a",
                row.token_version,
                &update,
                None,
                None,
            )
        });
        for result in futures_util::future::join_all(commits).await {
            assert!(
                matches!(result, Err(StoreError::Unavailable(_))),
                "[{label}] {result:?}"
            );
        }
        drop_test_database(&test.url).await;
    }
}

#[tokio::test]
async fn a_lease_is_not_cleared_under_the_one_who_took_it() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let mut row = instance(org, "held");
        row.next_due_at = Some(NOW + 3_600_000);
        store.insert_instance(&row, None).await.unwrap();

        // An import under a hold, due at once: the hold's lease stays, so the scheduler cannot
        // claim the row before the hold ends, and no other replica can take it.
        store
            .try_acquire_refresh_lease(row.id, "replica-a", NOW, NOW + 10_000, true)
            .await
            .unwrap()
            .expect(label);
        let imported = Reauthentication {
            tokens: TokenUpdate {
                refresh_token_enc: Some(bytes("refresh-imported")),
                next_due_at: Some(NOW),
                ..TokenUpdate::default()
            },
            client_secret_enc: None,
            verification: None,
            lease_held_by: Some("replica-a".to_string()),
            landed_code: None,
            name: None,
            tags_json: None,
            expected_updated_at: None,
        };
        // A hold that lost its lease (its renewals failed and another replica took it) writes
        // nothing under the other's live lease; under its own it writes.
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let taken = instance(org, "taken");
        store.insert_instance(&taken, None).await.unwrap();
        store
            .try_acquire_refresh_lease(taken.id, "replica-b", wall, wall + 60_000, true)
            .await
            .unwrap()
            .expect(label);
        let lost = Reauthentication {
            lease_held_by: Some("replica-c".to_string()),
            tokens: TokenUpdate {
                refresh_token_enc: Some(bytes("refresh-lost")),
                ..TokenUpdate::default()
            },
            ..Reauthentication::default()
        };
        assert!(
            store
                .reauthenticate(org, taken.id, &lost, None)
                .await
                .unwrap()
                .is_none(),
            "[{label}] written under another's lease"
        );
        let own = Reauthentication {
            lease_held_by: Some("replica-b".to_string()),
            ..lost.clone()
        };
        assert!(
            store
                .reauthenticate(org, taken.id, &own, None)
                .await
                .unwrap()
                .is_some(),
            "[{label}] not written under its own lease"
        );
        let written = store
            .reauthenticate(org, row.id, &imported, None)
            .await
            .unwrap()
            .expect(label);
        assert_eq!(
            written.refresh_lease_owner.as_deref(),
            Some("replica-a"),
            "[{label}]"
        );
        assert!(
            store
                .claim_due(NOW + 1, 10, "replica-a", NOW + 30_000)
                .await
                .unwrap()
                .is_empty(),
            "[{label}] the scheduler claimed a held row"
        );
        assert!(
            store
                .try_acquire_refresh_lease(row.id, "replica-b", NOW + 1, NOW + 10_000, true)
                .await
                .unwrap()
                .is_none(),
            "[{label}]"
        );
        assert!(
            store
                .release_refresh_lease(row.id, "replica-a")
                .await
                .unwrap()
        );

        // Now due and free: the scheduler claims it; a flight of the same replica takes the
        // claim over (renews it, even within the same millisecond); the scheduler's give-back
        // of its claim then leaves the flight's lease alone.
        let claimed = store
            .claim_due(NOW + 2, 10, "replica-a", NOW + 30_000)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "[{label}]");
        let (claimed, _) = &claimed[0];
        let claimed_until = claimed.refresh_lease_until.expect(label);
        let taken_over = store
            .renew_refresh_lease(row.id, "replica-a", claimed_until)
            .await
            .unwrap()
            .expect(label);
        assert!(
            taken_over.refresh_lease_until > Some(claimed_until),
            "[{label}]"
        );
        assert!(
            !store
                .release_claim(
                    row.id,
                    "replica-a",
                    claimed_until,
                    claimed.token_version,
                    NOW + 2,
                    NOW
                )
                .await
                .unwrap(),
            "[{label}] the give-back cleared the flight's lease"
        );
        let now = store.get_instance_by_id(row.id).await.unwrap().unwrap();
        assert_eq!(
            now.refresh_lease_owner.as_deref(),
            Some("replica-a"),
            "[{label}]"
        );
        assert!(
            store
                .try_acquire_refresh_lease(row.id, "replica-b", NOW + 3, NOW + 10_000, true)
                .await
                .unwrap()
                .is_none(),
            "[{label}]"
        );
        // A claim nobody took over is given back, and the mark it made goes with it.
        let until = now.refresh_lease_until.unwrap();
        assert!(
            store
                .release_claim(
                    row.id,
                    "replica-a",
                    until,
                    now.token_version,
                    NOW + 2,
                    NOW + 5
                )
                .await
                .unwrap(),
            "[{label}]"
        );
        let released = store.get_instance_by_id(row.id).await.unwrap().unwrap();
        assert_eq!(released.refresh_in_flight_since, None, "[{label}]");

        // A refresh that never finished (its replica stalled past its lease): the claim of
        // another replica given back (its rate limit) keeps that mark. It was cleared, and
        // the next taker presented a refresh token the provider may have rotated away, with
        // no "refresh interrupted" to explain the `invalid_grant`.
        store
            .try_acquire_refresh_lease(row.id, "replica-a", NOW + 100, NOW + 200, true)
            .await
            .unwrap()
            .expect(label);
        let claimed = store
            .claim_due(NOW + 300, 10, "replica-b", NOW + 30_300)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "[{label}]");
        let (claimed, _) = &claimed[0];
        assert_eq!(
            claimed.refresh_in_flight_since,
            Some(NOW + 100),
            "[{label}]"
        );
        assert!(
            store
                .release_claim(
                    row.id,
                    "replica-b",
                    NOW + 30_300,
                    claimed.token_version,
                    NOW + 300,
                    NOW + 400
                )
                .await
                .unwrap(),
            "[{label}]"
        );
        let released = store.get_instance_by_id(row.id).await.unwrap().unwrap();
        assert_eq!(released.refresh_lease_owner, None, "[{label}]");
        assert_eq!(
            released.refresh_in_flight_since,
            Some(NOW + 100),
            "[{label}] the interrupted refresh's mark was lost"
        );
        test.cleanup().await;
    }
}

#[tokio::test]
async fn token_commit_is_compare_and_swap_with_its_event() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let row = InstanceRow {
            configuration: r#"{"base.url":"https://us.example","custom":"kept"}"#.to_string(),
            ..instance(org, "cas")
        };
        store.insert_instance(&row, None).await.unwrap();
        let leased = store
            .try_acquire_refresh_lease(row.id, "me", NOW, NOW + 30_000, true)
            .await
            .unwrap()
            .unwrap();
        // A refresh that was in trouble before.
        store
            .record_transient_failure(
                row.id,
                "someone-else",
                NOW,
                "503",
                NOW + 5_000,
                None,
                None,
                None,
            )
            .await
            .unwrap();

        let update = TokenUpdate {
            access_token_enc: Some(bytes("access-2")),
            refresh_token_enc: None,
            token_response_enc: Some(bytes("response-2")),
            access_expires_at: Some(NOW + 3_600_000),
            refresh_expires_at: None,
            last_refresh_at: Some(NOW),
            next_due_at: Some(NOW + 3_000_000),
            configuration_json: Some(r#"{"base.url":"https://eu.example"}"#.to_string()),
        };
        let refreshed = event(org, row.id, "instance.token.refreshed", NOW);
        assert!(
            store
                .commit_refreshed_tokens(
                    row.id,
                    "me",
                    leased.token_version,
                    &update,
                    Some(&refreshed)
                )
                .await
                .unwrap()
        );
        let after = store.get_instance(org, row.id).await.unwrap().unwrap();
        assert_eq!(after.token_version, leased.token_version + 1);
        assert_eq!(after.access_token_enc, Some(bytes("access-2")));
        assert_eq!(
            after.refresh_token_enc,
            Some(bytes("refresh-1")),
            "not rotated: kept"
        );
        assert_eq!(after.token_response_enc, Some(bytes("response-2")));
        // The commit's configuration keys are merged in; the others stay.
        let configuration: serde_json::Value = serde_json::from_str(&after.configuration).unwrap();
        assert_eq!(
            configuration,
            serde_json::json!({"base.url": "https://eu.example", "custom": "kept"}),
            "[{label}]"
        );
        assert_eq!(
            (after.next_due_at, after.last_refresh_at),
            (Some(NOW + 3_000_000), Some(NOW))
        );
        assert_eq!(
            (
                after.refresh_lease_owner.clone(),
                after.refresh_in_flight_since
            ),
            (None, None)
        );
        assert_eq!((after.failing_since, after.failure_count), (None, 0));
        assert_eq!(
            (after.backoff_until, after.last_failure.clone()),
            (None, None)
        );
        assert!(after.is_valid());
        assert_eq!(
            events_of(store, org, row.id).await,
            ["instance.token.refreshed"]
        );

        // A stale version loses, and its event is not written.
        let stale = event(org, row.id, "instance.token.refreshed", NOW + 1);
        let rotated = TokenUpdate {
            refresh_token_enc: Some(bytes("refresh-3")),
            ..update.clone()
        };
        assert!(
            !store
                .commit_refreshed_tokens(row.id, "me", leased.token_version, &rotated, Some(&stale))
                .await
                .unwrap(),
            "{label}"
        );
        assert_eq!(events_of(store, org, row.id).await.len(), 1, "{label}");
        // The current version wins and stores the rotated refresh token.
        assert!(
            store
                .commit_refreshed_tokens(row.id, "me", after.token_version, &rotated, None)
                .await
                .unwrap()
        );
        let rotated_row = store.get_instance(org, row.id).await.unwrap().unwrap();
        assert_eq!(rotated_row.refresh_token_enc, Some(bytes("refresh-3")));

        // The event is in the same transaction: when it cannot be written (its id is taken),
        // the token update is rolled back too.
        let duplicate = NewEvent {
            occurred_at: NOW + 2,
            ..refreshed.clone()
        };
        let result = store
            .commit_refreshed_tokens(
                row.id,
                "me",
                rotated_row.token_version,
                &TokenUpdate {
                    access_token_enc: Some(bytes("lost")),
                    ..update.clone()
                },
                Some(&duplicate),
            )
            .await;
        assert!(
            matches!(result, Err(StoreError::Conflict(_))),
            "{label}: {result:?}"
        );
        let unchanged = store.get_instance(org, row.id).await.unwrap().unwrap();
        assert_eq!(
            unchanged.token_version, rotated_row.token_version,
            "{label}"
        );
        assert_eq!(
            unchanged.access_token_enc,
            Some(bytes("access-2")),
            "{label}"
        );
        assert!(
            !store
                .commit_refreshed_tokens(random_id(), "me", 0, &update, None)
                .await
                .unwrap()
        );
        test.cleanup().await;
    }
}

const GROUP: usize = 40;

fn group_update(n: usize) -> TokenUpdate {
    TokenUpdate {
        access_token_enc: Some(bytes(&format!("access-{n}"))),
        refresh_token_enc: n.is_multiple_of(2).then(|| bytes(&format!("refresh-{n}"))),
        token_response_enc: Some(bytes(&format!("response-{n}"))),
        access_expires_at: Some(NOW + n as i64),
        refresh_expires_at: None,
        last_refresh_at: Some(NOW),
        next_due_at: Some(NOW + 1_000 + n as i64),
        configuration_json: None,
    }
}

/// Every fifth commit of a round presents a stale version.
fn stale(n: usize) -> bool {
    n % 5 == 4
}

/// Commits a new token set to every row at once, each with its event; commit 17's event gets
/// the id `taken` when given.
async fn commit_round(
    store: &Store,
    org: i64,
    rows: &[InstanceRow],
    taken: Option<&str>,
) -> Vec<Result<Option<InstanceRow>, StoreError>> {
    futures_util::future::join_all(rows.iter().enumerate().map(|(n, row)| {
        let mut refreshed = event(org, row.id, "instance.token.refreshed", NOW);
        if n == 17
            && let Some(taken) = taken
        {
            refreshed.id = taken.to_string();
        }
        let version = row.token_version - i64::from(stale(n));
        async move {
            store
                .commit_refreshed_tokens_returning(
                    row.id,
                    "me",
                    version,
                    &group_update(n),
                    Some(&refreshed),
                    None,
                )
                .await
        }
    }))
    .await
}

/// Commits made at the same moment go out grouped (PostgreSQL: one statement; SQLite: one
/// transaction), each row keeping its own compare-and-swap and its own event; a batch with a
/// bad commit in it is retried one by one, so only that commit fails.
#[tokio::test]
async fn concurrent_token_commits_each_keep_their_compare_and_swap() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let mut rows = Vec::new();
        for n in 0..GROUP {
            let row = instance(org, &format!("group-{n}"));
            store.insert_instance(&row, None).await.unwrap();
            rows.push(store.get_instance(org, row.id).await.unwrap().unwrap());
        }
        let results = commit_round(store, org, &rows, None).await;
        for (n, (row, result)) in rows.iter().zip(&results).enumerate() {
            let committed = result.as_ref().unwrap();
            let after = store.get_instance(org, row.id).await.unwrap().unwrap();
            if stale(n) {
                assert!(committed.is_none(), "{label}: commit {n} was stale");
                assert_eq!(after.token_version, row.token_version, "{label}");
                assert_eq!(after.access_token_enc, Some(bytes("access-1")), "{label}");
                assert!(
                    events_of(store, org, row.id).await.is_empty(),
                    "{label}: {n}"
                );
            } else {
                let committed = committed.as_ref().expect("committed");
                assert_eq!(committed, &after, "{label}: the answer is the stored row");
                assert_eq!(after.token_version, row.token_version + 1, "{label}");
                assert_eq!(after.access_token_enc, Some(bytes(&format!("access-{n}"))));
                let refresh = if n % 2 == 0 {
                    format!("refresh-{n}")
                } else {
                    "refresh-1".to_string()
                };
                assert_eq!(after.refresh_token_enc, Some(bytes(&refresh)), "{label}");
                assert_eq!(after.next_due_at, Some(NOW + 1_000 + n as i64));
                assert_eq!(
                    events_of(store, org, row.id).await,
                    ["instance.token.refreshed"],
                    "{label}: {n}"
                );
            }
        }
        assert!(
            store.grouped_commits() > 0,
            "{label}: concurrent commits went out grouped"
        );

        // A second round in which commit 17's event id is already taken: that commit fails
        // and writes nothing; every other one is as if it had been alone.
        let taken = store
            .list_events(
                org,
                &EventFilter {
                    limit: 1,
                    ..EventFilter::default()
                },
            )
            .await
            .unwrap()[0]
            .id
            .clone();
        let mut before = Vec::new();
        for row in &rows {
            before.push(store.get_instance(org, row.id).await.unwrap().unwrap());
        }
        let rows = before;
        let results = commit_round(store, org, &rows, Some(&taken)).await;
        for (n, (row, result)) in rows.iter().zip(&results).enumerate() {
            let after = store.get_instance(org, row.id).await.unwrap().unwrap();
            if n == 17 {
                assert!(
                    matches!(result, Err(StoreError::Conflict(_))),
                    "{label}: {result:?}"
                );
                assert_eq!(after.token_version, row.token_version, "{label}");
            } else if stale(n) {
                assert!(result.as_ref().unwrap().is_none(), "{label}: {n}");
                assert_eq!(after.token_version, row.token_version, "{label}");
            } else {
                assert!(result.as_ref().unwrap().is_some(), "{label}: {n}");
                assert_eq!(after.token_version, row.token_version + 1, "{label}");
            }
        }
        test.cleanup().await;
    }
}

#[tokio::test]
async fn failures_invalidation_and_reauthentication() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let mut row = instance(org, "fragile");
        row.next_due_at = Some(NOW);
        row.tags = r#"["keep"]"#.to_string();
        store.insert_instance(&row, None).await.unwrap();

        // Transient failures: the instance stays valid, failing_since stays at the first one,
        // the schedule waits for the backoff, the owner's lease is released.
        store
            .try_acquire_refresh_lease(row.id, "me", NOW, NOW + 1_000, true)
            .await
            .unwrap()
            .unwrap();
        assert!(
            store
                .record_transient_failure(
                    row.id,
                    "me",
                    NOW,
                    "token endpoint 503",
                    NOW + 60_000,
                    None,
                    None,
                    None
                )
                .await
                .unwrap()
        );
        let failing_event = event(org, row.id, "instance.refresh.failing", NOW + 10);
        assert!(
            store
                .record_transient_failure(
                    row.id,
                    "me",
                    NOW + 10,
                    "timeout",
                    NOW + 120_000,
                    Some(&failing_event),
                    None,
                    None
                )
                .await
                .unwrap()
        );
        let failing = store.get_instance(org, row.id).await.unwrap().unwrap();
        assert!(failing.is_valid(), "{label}");
        assert_eq!(failing.failing_since, Some(NOW));
        assert_eq!(failing.failure_count, 2);
        assert_eq!(failing.last_failure.as_deref(), Some("timeout"));
        assert_eq!(failing.backoff_until, Some(NOW + 120_000));
        assert_eq!(failing.next_due_at, Some(NOW + 120_000));
        assert_eq!(failing.refresh_lease_owner, None);
        assert_eq!(
            events_of(store, org, row.id).await,
            ["instance.refresh.failing"]
        );
        // In backoff, the row is not claimed.
        assert!(
            store
                .claim_due_instances(NOW + 60_000, 10, "s", NOW + 90_000)
                .await
                .unwrap()
                .is_empty()
        );

        // Invalid: reason and provider message kept, lease and schedule cleared, event written.
        store
            .try_acquire_refresh_lease(row.id, "me", NOW + 200_000, NOW + 230_000, true)
            .await
            .unwrap()
            .unwrap();
        let invalidated = event(org, row.id, "instance.invalidated", NOW + 200_000);
        assert!(
            store
                .mark_invalid(
                    row.id,
                    "invalid_grant",
                    Some("invalid_grant: revoked"),
                    Some(&invalidated),
                    None,
                    false
                )
                .await
                .unwrap()
        );
        let invalid = store.get_instance(org, row.id).await.unwrap().unwrap();
        assert_eq!(invalid.instance_state(), InstanceState::Invalid);
        assert_eq!(invalid.state_reason.as_deref(), Some("invalid_grant"));
        assert_eq!(
            invalid.provider_message.as_deref(),
            Some("invalid_grant: revoked")
        );
        assert_eq!(
            (invalid.next_due_at, invalid.refresh_lease_owner.clone()),
            (None, None)
        );
        assert_eq!(invalid.refresh_in_flight_since, None);
        assert!(
            !store
                .mark_invalid(random_id(), "x", None, None, None, false)
                .await
                .unwrap()
        );

        // Re-authentication: valid again, same id, token, name and tags; new tokens as given.
        let reauth = Reauthentication {
            tokens: TokenUpdate {
                access_token_enc: Some(bytes("access-new")),
                refresh_token_enc: Some(bytes("refresh-new")),
                next_due_at: Some(NOW + 500_000),
                ..TokenUpdate::default()
            },
            client_secret_enc: Some(Some(bytes("secret-new"))),
            verification: Some(r#"{"ok":true}"#.to_string()),
            lease_held_by: None,
            landed_code: None,
            name: None,
            tags_json: None,
            expected_updated_at: None,
        };
        let reauthenticated = event(org, row.id, "instance.reauthenticated", NOW + 300_000);
        let valid = store
            .reauthenticate(org, row.id, &reauth, Some(&reauthenticated))
            .await
            .unwrap()
            .unwrap();
        assert!(valid.is_valid(), "{label}");
        assert_eq!(
            (valid.state_reason.clone(), valid.provider_message.clone()),
            (None, None)
        );
        assert_eq!(
            (
                valid.failing_since,
                valid.failure_count,
                valid.backoff_until
            ),
            (None, 0, None)
        );
        assert_eq!(valid.token_version, invalid.token_version + 1);
        assert_eq!(
            (valid.id, &valid.token_enc, &valid.name),
            (row.id, &row.token_enc, &row.name)
        );
        assert_eq!(valid.tags, row.tags);
        assert_eq!(valid.refresh_token_enc, Some(bytes("refresh-new")));
        assert_eq!(valid.client_secret_enc, Some(bytes("secret-new")));
        assert_eq!(valid.verification.as_deref(), Some(r#"{"ok":true}"#));
        assert_eq!(
            events_of(store, org, row.id).await,
            [
                "instance.reauthenticated",
                "instance.invalidated",
                "instance.refresh.failing"
            ]
        );

        // Replacing tokens (import, blanking) writes them as given and bumps the version.
        let blanked = store
            .replace_tokens(org, row.id, &TokenUpdate::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (&blanked.access_token_enc, &blanked.refresh_token_enc),
            (&None, &None)
        );
        assert_eq!(blanked.token_version, valid.token_version + 1);
        assert!(blanked.is_valid());
        assert!(
            store
                .replace_tokens(
                    organization(store, "B").await,
                    row.id,
                    &TokenUpdate::default()
                )
                .await
                .unwrap()
                .is_none()
        );
        test.cleanup().await;
    }
}

#[tokio::test]
async fn schedule_due_instances_and_in_flight() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        assert_eq!(store.next_due_time().await.unwrap(), None);

        let mut due = instance(org, "due");
        due.next_due_at = Some(NOW - 10);
        let mut later = instance(org, "later");
        later.next_due_at = Some(NOW + 60_000);
        let mut invalid = instance(org, "invalid");
        invalid.next_due_at = Some(NOW - 100);
        invalid.state = "invalid".to_string();
        let mut disabled = instance(org, "disabled");
        disabled.next_due_at = Some(NOW - 100);
        disabled.disabled = 1;
        let mut leased = instance(org, "leased");
        leased.next_due_at = Some(NOW - 100);
        leased.refresh_lease_owner = Some("other".to_string());
        leased.refresh_lease_until = Some(NOW + 5_000);
        let unscheduled = instance(org, "unscheduled");
        for row in [&due, &later, &invalid, &disabled, &leased, &unscheduled] {
            store.insert_instance(row, None).await.unwrap();
        }
        // The leased row counts for the schedule (its lease may be abandoned); the invalid and
        // disabled ones do not.
        assert_eq!(
            store.next_due_time().await.unwrap(),
            Some(NOW - 100),
            "{label}"
        );

        let claimed = store
            .claim_due_instances(NOW, 10, "me", NOW + 30_000)
            .await
            .unwrap();
        assert_eq!(
            claimed.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["due"]
        );
        assert_eq!(claimed[0].refresh_lease_owner.as_deref(), Some("me"));
        assert_eq!(claimed[0].refresh_in_flight_since, Some(NOW));
        assert_eq!(claimed[0].next_due_at, Some(NOW + 30_000));
        assert!(
            store
                .claim_due_instances(NOW, 10, "me", NOW + 30_000)
                .await
                .unwrap()
                .is_empty()
        );

        // After the other lease runs out, its row is claimable.
        let claimed = store
            .claim_due_instances(NOW + 5_001, 10, "me", NOW + 35_000)
            .await
            .unwrap();
        assert_eq!(
            claimed.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["leased"]
        );
        assert_eq!(store.next_due_time().await.unwrap(), Some(NOW + 30_000));

        // Crash recovery: refreshes that started before a point and never finished.
        let in_flight = store
            .instances_with_refresh_in_flight(NOW + 1)
            .await
            .unwrap();
        assert_eq!(
            in_flight
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["due"]
        );
        assert_eq!(
            store
                .instances_with_refresh_in_flight(NOW + 5_002)
                .await
                .unwrap()
                .len(),
            2
        );
        test.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_share_a_row() {
    for test in test_stores().await {
        let store = &test.store;
        let label = test.label.clone();
        let org = organization(store, "A").await;
        // Several rounds make an overlap of the claimers all but certain; claimed rows keep
        // their lease past every later round, so each round claims only its own rows.
        for round in 0..4_i64 {
            let now = NOW + round * 1_000_000;
            let mut ids = HashSet::new();
            for index in 0..200 {
                let mut row = instance(org, &format!("r{round}-i{index}"));
                row.next_due_at = Some(now - index);
                ids.insert(row.id);
                store.insert_instance(&row, None).await.unwrap();
            }
            // The claimers start together and take overlapping batches, so that without row
            // locking they would pick the same candidates.
            let start = std::sync::Arc::new(tokio::sync::Barrier::new(4));
            let mut claimers = Vec::new();
            for claimer in 0..4 {
                let store = store.clone();
                let start = start.clone();
                claimers.push(tokio::spawn(async move {
                    let owner = format!("claimer-{claimer}");
                    let mut mine = Vec::new();
                    start.wait().await;
                    loop {
                        let batch = store
                            .claim_due_instances(now, 25, &owner, NOW * 2)
                            .await
                            .unwrap();
                        if batch.is_empty() {
                            break;
                        }
                        for row in batch {
                            assert_eq!(row.refresh_lease_owner.as_deref(), Some(owner.as_str()));
                            mine.push(row.id);
                        }
                        tokio::task::yield_now().await;
                    }
                    mine
                }));
            }
            let mut all = Vec::new();
            for claimer in claimers {
                all.extend(claimer.await.unwrap());
            }
            let unique: HashSet<i64> = all.iter().copied().collect();
            assert_eq!(
                all.len(),
                200,
                "{label}, round {round}: no row claimed twice"
            );
            assert_eq!(unique, ids, "{label}, round {round}: every row claimed");
        }
        test.cleanup().await;
    }
}

/// An organization's event ids as paging through them with `limit` a page gives them.
async fn paged_event_ids(store: &Store, organization_id: i64, limit: i64) -> Vec<String> {
    let mut ids = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .list_events(
                organization_id,
                &EventFilter {
                    limit,
                    before: before.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        before = Some(EventCursor {
            occurred_at: last.occurred_at,
            id: last.id.clone(),
        });
        ids.extend(page.into_iter().map(|e| e.id));
    }
    ids
}

#[tokio::test]
async fn events_listing_and_delivery() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let other = organization(store, "B").await;
        let mut inserted = Vec::new();
        for index in 0..5_i64 {
            let mut new = event(org, 1 + index % 2, "instance.token.refreshed", NOW + index);
            if index == 4 {
                new.event_type = "instance.invalidated".to_string();
                new.reason = Some("invalid_grant".to_string());
            }
            store.insert_event(&new).await.unwrap();
            inserted.push(new);
        }
        store
            .insert_event(&event(other, 1, "instance.deleted", NOW))
            .await
            .unwrap();
        assert!(
            matches!(
                store.insert_event(&inserted[0]).await,
                Err(StoreError::Conflict(_))
            ),
            "{label}"
        );

        let all = store
            .list_events(
                org,
                &EventFilter {
                    limit: 100,
                    ..EventFilter::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(all.len(), 5, "{label}: only this organization's");
        assert_eq!(all[0].id, inserted[4].id, "newest first");
        assert_eq!(all[0].reason.as_deref(), Some("invalid_grant"));
        assert_eq!(all[0].payload, inserted[4].payload);

        let of_instance = store
            .list_events(
                org,
                &EventFilter {
                    instance_id: Some(1),
                    limit: 100,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(of_instance.len(), 3);
        let of_type = store
            .list_events(
                org,
                &EventFilter {
                    event_type: Some("instance.invalidated".to_string()),
                    limit: 100,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(of_type.len(), 1);

        // Paging with a cursor walks every event once.
        let seen = paged_event_ids(store, org, 2).await;
        assert_eq!(seen, all.iter().map(|e| e.id.clone()).collect::<Vec<_>>());
        assert_eq!(store.get_event(other, &inserted[0].id).await.unwrap(), None);

        // Events of one millisecond (an invalidation and the recovery after it): newest first
        // as they were written, whatever their ids say; paging walks them so too.
        let third = organization(store, "C").await;
        for id in ["evt-d", "evt-c", "evt-b", "evt-a"] {
            let mut new = event(third, 1, "instance.token.refreshed", NOW);
            new.id = id.to_string();
            store.insert_event(&new).await.unwrap();
        }
        let newest_first = ["evt-a", "evt-b", "evt-c", "evt-d"];
        let listed = store
            .list_events(
                third,
                &EventFilter {
                    limit: 100,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            listed.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            newest_first,
            "{label}"
        );
        assert_eq!(
            paged_event_ids(store, third, 1).await,
            newest_first,
            "{label}"
        );

        // Delivery: only pending events whose time has come are claimed, once.
        let mut pending = event(org, 9, "instance.token.refreshed", NOW);
        pending.delivery_state = DeliveryState::Pending;
        pending.next_attempt_at = Some(NOW);
        store.insert_event(&pending).await.unwrap();
        let mut future = event(org, 9, "instance.token.refreshed", NOW);
        future.delivery_state = DeliveryState::Pending;
        future.next_attempt_at = Some(NOW + 10_000);
        store.insert_event(&future).await.unwrap();

        let claimed = store
            .claim_pending_deliveries(NOW, 10, NOW + 30_000, 10, &[])
            .await
            .unwrap();
        assert_eq!(
            claimed.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
            [pending.id.clone()]
        );
        assert_eq!(
            (claimed[0].attempts, claimed[0].next_attempt_at),
            (1, Some(NOW + 30_000))
        );
        assert!(
            store
                .claim_pending_deliveries(NOW, 10, NOW + 30_000, 10, &[])
                .await
                .unwrap()
                .is_empty()
        );

        assert!(
            store
                .mark_delivery(
                    &pending.id,
                    DeliveryOutcome::RetryAt(NOW + 1),
                    Some("HTTP 500"),
                    Some(1)
                )
                .await
                .unwrap()
        );
        let retried = store
            .claim_pending_deliveries(NOW + 1, 10, NOW + 30_000, 10, &[])
            .await
            .unwrap();
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].attempts, 2);
        assert_eq!(retried[0].last_error.as_deref(), Some("HTTP 500"));
        // The first claim's deliverer, late (its claim ran out and the event was claimed
        // again): its outcome is not written over the second claim's.
        assert!(
            !store
                .mark_delivery(
                    &pending.id,
                    DeliveryOutcome::RetryAt(NOW + 5),
                    Some("HTTP 500"),
                    Some(1)
                )
                .await
                .unwrap()
        );
        assert!(
            store
                .mark_delivery(
                    &pending.id,
                    DeliveryOutcome::Delivered { at: NOW + 2 },
                    None,
                    Some(2)
                )
                .await
                .unwrap()
        );
        let delivered = store.get_event(org, &pending.id).await.unwrap().unwrap();
        assert_eq!(delivered.delivery_state, "delivered");
        assert_eq!(
            (delivered.delivered_at, delivered.last_error),
            (Some(NOW + 2), None)
        );
        assert!(
            store
                .mark_delivery(&future.id, DeliveryOutcome::Failed, Some("gave up"), None)
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .get_event(org, &future.id)
                .await
                .unwrap()
                .unwrap()
                .delivery_state,
            "failed"
        );
        assert!(
            store
                .claim_pending_deliveries(NOW + 100_000, 10, NOW, 10, &[])
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            !store
                .mark_delivery("nope", DeliveryOutcome::Failed, None, None)
                .await
                .unwrap()
        );
        test.cleanup().await;
    }
}

/// One organization's many due webhooks (slow receivers, say) take at most its share of a
/// claim, and none while it has that many in flight: the other organizations' events go out
/// beside them. They took every slot, in the order they fell due.
#[tokio::test]
async fn webhook_claims_give_each_organization_a_fair_share() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let busy = organization(store, "busy").await;
        let quiet = organization(store, "quiet").await;
        let due = |org: i64, instance: i64, at: i64| {
            let mut pending = event(org, instance, "instance.token.refreshed", at);
            pending.delivery_state = DeliveryState::Pending;
            pending.next_attempt_at = Some(at);
            pending
        };
        // The busy organization's events fall due first, one per instance.
        for n in 0..10 {
            store
                .insert_event(&due(busy, 100 + n, NOW - 1_000 + n))
                .await
                .unwrap();
        }
        for n in 0..2 {
            store.insert_event(&due(quiet, 200 + n, NOW)).await.unwrap();
        }
        let claimed = store
            .claim_pending_deliveries(NOW, 16, NOW + 30_000, 4, &[])
            .await
            .unwrap();
        let of = |org: i64, rows: &[tokenwarden::store::EventRow]| {
            rows.iter().filter(|e| e.organization_id == org).count()
        };
        assert_eq!(
            (of(busy, &claimed), of(quiet, &claimed)),
            (4, 2),
            "[{label}]"
        );
        // With its share in flight, the busy organization gets nothing more for now.
        for n in 0..3 {
            store.insert_event(&due(quiet, 300 + n, NOW)).await.unwrap();
        }
        let claimed = store
            .claim_pending_deliveries(NOW, 16, NOW + 30_000, 4, &[busy])
            .await
            .unwrap();
        assert_eq!(
            (of(busy, &claimed), of(quiet, &claimed)),
            (0, 3),
            "[{label}]"
        );
        test.cleanup().await;
    }
}

#[tokio::test]
async fn audit_log() {
    for test in test_stores().await {
        let store = &test.store;
        let org = organization(store, "A").await;
        let other = organization(store, "B").await;
        let mut ids = Vec::new();
        for index in 0..3 {
            ids.push(
                store
                    .insert_audit(&NewAudit {
                        organization_id: org,
                        user_id: Some(7),
                        action: format!("action-{index}"),
                        target: Some(format!("instance/{index}")),
                        request_id: Some("req".to_string()),
                        detail: None,
                        at: NOW + index,
                    })
                    .await
                    .unwrap(),
            );
        }
        store
            .insert_audit(&NewAudit {
                organization_id: other,
                user_id: None,
                action: "other".to_string(),
                target: None,
                request_id: None,
                detail: Some("{}".to_string()),
                at: NOW,
            })
            .await
            .unwrap();
        let page = store.list_audit(org, 2, None).await.unwrap();
        assert_eq!(
            page.iter().map(|a| a.action.as_str()).collect::<Vec<_>>(),
            ["action-2", "action-1"]
        );
        assert_eq!(page[0].id, ids[2]);
        assert_eq!(page[0].target.as_deref(), Some("instance/2"));
        let rest = store.list_audit(org, 2, Some(page[1].id)).await.unwrap();
        assert_eq!(
            rest.iter().map(|a| a.action.as_str()).collect::<Vec<_>>(),
            ["action-0"]
        );
        assert_eq!(store.list_audit(other, 10, None).await.unwrap().len(), 1);
        test.cleanup().await;
    }
}

/// The audit purge deletes the oldest entries made before its time, a batch at a time, and
/// looks no further than its batch.
#[tokio::test]
async fn old_audit_entries_are_purged_in_batches() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        for (index, at) in [NOW - 30, NOW - 20, NOW - 10, NOW, NOW - 5]
            .into_iter()
            .enumerate()
        {
            store
                .insert_audit(&NewAudit {
                    organization_id: org,
                    user_id: None,
                    action: format!("action-{index}"),
                    target: None,
                    request_id: None,
                    detail: None,
                    at,
                })
                .await
                .unwrap();
        }
        let left = async || {
            let rows = store.list_audit(org, 10, None).await.unwrap();
            rows.into_iter().map(|row| row.action).collect::<Vec<_>>()
        };
        assert_eq!(store.purge_old_audit(NOW, 2).await.unwrap(), 2, "[{label}]");
        assert_eq!(
            left().await,
            ["action-4", "action-3", "action-2"],
            "[{label}]"
        );
        // The next batch is action-2 (old) and action-3 (not): one goes.
        assert_eq!(store.purge_old_audit(NOW, 2).await.unwrap(), 1, "[{label}]");
        // action-3 is the oldest by id now and is not old, so the old action-4 behind it
        // waits: the purge reads one batch, not the table.
        assert_eq!(store.purge_old_audit(NOW, 1).await.unwrap(), 0, "[{label}]");
        assert_eq!(store.purge_old_audit(NOW, 2).await.unwrap(), 1, "[{label}]");
        assert_eq!(left().await, ["action-3"], "[{label}]");
        test.cleanup().await;
    }
}

#[tokio::test]
async fn encrypted_fields_for_key_rotation() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let mut rows = Vec::new();
        for index in 0..5 {
            let row = instance(org, &format!("r{index}"));
            store.insert_instance(&row, None).await.unwrap();
            rows.push(row);
        }
        let mut batches = 0;
        let mut after = 0;
        let mut seen = Vec::new();
        loop {
            let batch = store.list_encrypted_batch(after, 2).await.unwrap();
            let Some(last) = batch.last() else { break };
            after = last.id;
            batches += 1;
            for fields in batch {
                let rotated = EncryptedInstanceFields {
                    token_enc: [b"k2:".as_slice(), &fields.token_enc].concat(),
                    access_token_enc: Some(bytes("k2:access")),
                    ..fields.clone()
                };
                assert!(store.update_encrypted_fields(&rotated).await.unwrap());
                seen.push(fields.id);
            }
        }
        assert_eq!(batches, 3);
        let mut expected: Vec<i64> = rows.iter().map(|r| r.id).collect();
        expected.sort();
        assert_eq!(seen, expected, "{label}");
        let after_rotation = store.get_instance(org, rows[0].id).await.unwrap().unwrap();
        assert!(after_rotation.token_enc.starts_with(b"k2:"));
        assert_eq!(
            after_rotation.token_version, rows[0].token_version,
            "same plain values"
        );

        // A refresh committed in between makes the rewrite fail instead of undoing it.
        let stale = store.list_encrypted_batch(0, 1).await.unwrap().remove(0);
        store
            .replace_tokens(org, stale.id, &TokenUpdate::default())
            .await
            .unwrap()
            .unwrap();
        assert!(
            !store.update_encrypted_fields(&stale).await.unwrap(),
            "{label}"
        );
        test.cleanup().await;
    }
}

/// An answer about an old grant (a refresh that raced a re-authentication, or another
/// replica's refresh) must not invalidate or back off the grant that replaced it.
#[tokio::test]
async fn invalidation_and_backoff_are_conditional_on_the_token_version() {
    for test in test_stores().await {
        let store = &test.store;
        let org = organization(store, "versions").await;
        let row = instance(org, "moved on");
        store.insert_instance(&row, None).await.unwrap();
        let stale = row.token_version - 1;
        assert!(
            !store
                .mark_invalid(
                    row.id,
                    "invalid_grant",
                    Some("old grant"),
                    None,
                    Some(stale),
                    false
                )
                .await
                .unwrap(),
            "[{}] a stale version does not invalidate",
            test.label
        );
        assert!(
            !store
                .record_transient_failure(row.id, "me", 1, "503", 10, None, Some(stale), None)
                .await
                .unwrap(),
            "[{}] a stale version does not back off",
            test.label
        );
        let now = store.get_instance_by_id(row.id).await.unwrap().unwrap();
        assert!(
            now.is_valid() && now.backoff_until.is_none(),
            "[{}] {now:?}",
            test.label
        );
        // A failure of the configuration as it was read, recorded after a PATCH changed it
        // (the fix): not backed off for.
        let read = now.updated_at;
        store
            .update_instance_metadata(
                now.organization_id,
                now.id,
                &now.name,
                "[]",
                "{}",
                None,
                None,
                true,
            )
            .await
            .unwrap()
            .unwrap();
        assert!(
            !store
                .record_transient_failure(
                    row.id,
                    "me",
                    1,
                    "misconfigured",
                    10,
                    None,
                    None,
                    Some(read)
                )
                .await
                .unwrap(),
            "[{}] a failure of a configuration changed since",
            test.label
        );
        assert!(
            store
                .mark_invalid(
                    row.id,
                    "refresh interrupted: the provider no longer accepts the refresh token (invalid_grant)",
                    None,
                    None,
                    Some(row.token_version),
                    false
                )
                .await
                .unwrap(),
            "[{}] the current version does",
            test.label
        );
        assert!(
            !store
                .get_instance_by_id(row.id)
                .await
                .unwrap()
                .unwrap()
                .is_valid()
        );
        // Not over an invalidation of another kind (a grant refused outright): such an
        // instance stays invalid, and the tokens are not stored.
        let other = instance(org, "refused");
        store.insert_instance(&other, None).await.unwrap();
        assert!(
            store
                .mark_invalid(
                    other.id,
                    "invalid_grant: revoked",
                    None,
                    None,
                    Some(other.token_version),
                    false
                )
                .await
                .unwrap()
        );
        assert!(
            !store
                .commit_refreshed_tokens(
                    other.id,
                    "me",
                    other.token_version,
                    &TokenUpdate::default(),
                    None
                )
                .await
                .unwrap(),
            "[{}] a commit over a refused grant",
            test.label
        );
        assert!(
            !store
                .get_instance_by_id(other.id)
                .await
                .unwrap()
                .unwrap()
                .is_valid()
        );
        // Tokens committed at the version that was invalidated as "refresh interrupted" (the
        // rejection was about the refresh token this refresh retired, presented by the
        // replica that took the refresh over after the lease ran out): the grant lives, and
        // the instance is valid again.
        let late = TokenUpdate {
            access_token_enc: Some(bytes("access-late")),
            ..TokenUpdate::default()
        };
        let answered = store
            .commit_refreshed_tokens_returning(row.id, "me", row.token_version, &late, None, None)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("[{}] the late commit was refused", test.label));
        // The answer says what it undid, so that the revival is announced.
        assert_eq!(
            answered.revived_reason.as_deref(),
            Some(
                "refresh interrupted: the provider no longer accepts the refresh token (invalid_grant)"
            ),
            "[{}]",
            test.label
        );
        let revived = store.get_instance_by_id(row.id).await.unwrap().unwrap();
        assert!(
            revived.is_valid()
                && revived.state_reason.is_none()
                && revived.provider_message.is_none(),
            "[{}] {revived:?}",
            test.label
        );
        // The next commit undoes nothing.
        let next = store
            .commit_refreshed_tokens_returning(
                row.id,
                "me",
                revived.token_version,
                &late,
                None,
                None,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.revived_reason, None, "[{}]", test.label);
        let revived = next;
        // Commits arriving together (grouped into one statement on PostgreSQL) say so each.
        let mut interrupted = Vec::new();
        for n in 0..4 {
            let other = instance(org, &format!("grouped {n}"));
            store.insert_instance(&other, None).await.unwrap();
            let reason = format!("refresh interrupted: grouped {n}");
            assert!(
                store
                    .mark_invalid(
                        other.id,
                        &reason,
                        None,
                        None,
                        Some(other.token_version),
                        false
                    )
                    .await
                    .unwrap()
            );
            interrupted.push((other, reason));
        }
        let answers = futures_util::future::join_all(interrupted.iter().map(|(other, _)| {
            store.commit_refreshed_tokens_returning(
                other.id,
                "me",
                other.token_version,
                &late,
                None,
                None,
            )
        }))
        .await;
        for ((_, reason), answer) in interrupted.iter().zip(answers) {
            let answer = answer.unwrap().expect("committed");
            assert!(answer.is_valid(), "[{}] {answer:?}", test.label);
            assert_eq!(
                answer.revived_reason.as_deref(),
                Some(reason.as_str()),
                "[{}]",
                test.label
            );
        }
        // A revocation moves the version: a refresh in flight cannot commit after it.
        assert!(
            store
                .mark_invalid(
                    row.id,
                    "revoked",
                    None,
                    None,
                    Some(revived.token_version),
                    true
                )
                .await
                .unwrap()
        );
        assert!(
            !store
                .commit_refreshed_tokens(row.id, "me", revived.token_version, &late, None)
                .await
                .unwrap(),
            "[{}] a commit after a revocation",
            test.label
        );
        assert!(
            !store
                .get_instance_by_id(row.id)
                .await
                .unwrap()
                .unwrap()
                .is_valid()
        );
        test.cleanup().await;
    }
}

/// After an outage, the first instance that refreshes again makes the other instances of the
/// connector that back off due now: those of the same connector key, in backoff that ends
/// within the horizon, valid, enabled and not leased; nothing else moves.
#[tokio::test]
async fn a_recovery_makes_backed_off_instances_of_the_connector_due_now() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let other_org = organization(store, "B").await;
        let mut rows = Vec::new();
        for (owner, name, key) in [
            (org, "backing-off", "acme"),
            (org, "far-off", "acme"),
            (org, "leased", "acme"),
            (org, "other-connector", "globex"),
            (other_org, "other-org", "acme"),
            (org, "rate-limited", "acme"),
            (org, "asked-to-wait", "acme"),
            (org, "misconfigured", "acme"),
        ] {
            let mut row = instance(owner, name);
            row.element_key = key.to_string();
            row.next_due_at = Some(NOW);
            store.insert_instance(&row, None).await.unwrap();
            let backoff = if name == "far-off" {
                NOW + 900_000
            } else {
                NOW + 60_000
            };
            // A provider's 429 asked for its wait: a success elsewhere does not lift it.
            // Nor one a 503's `Retry-After` asked for, nor one for the app's refused
            // credentials (others' recovery does not fix them).
            let failure = match name {
                "rate-limited" => format!(
                    "{} (HTTP 429), retry after 60 s",
                    tokenwarden::oauth::RATE_LIMITED_TEXT
                ),
                "asked-to-wait" => format!(
                    "{} 60 s: the provider answered HTTP 503",
                    tokenwarden::oauth::ASKED_TO_WAIT_TEXT
                ),
                "misconfigured" => format!(
                    "{}: the provider refused the app's credentials (invalid_client)",
                    tokenwarden::refresh::MISCONFIGURED_TEXT
                ),
                _ => "503".to_string(),
            };
            assert!(
                store
                    .record_transient_failure(
                        row.id, "me", NOW, &failure, backoff, None, None, None
                    )
                    .await
                    .unwrap()
            );
            rows.push(row);
        }
        store
            .try_acquire_refresh_lease(rows[2].id, "me", NOW + 60_000, NOW + 70_000, true)
            .await
            .unwrap()
            .unwrap();
        let now = NOW + 1_000;
        // An organization's connector: only that organization's instances.
        let moved = store
            .expedite_backoffs(Some(org), "acme", now, 300_000)
            .await
            .unwrap();
        assert_eq!(
            moved, 1,
            "[{label}] only the one in a near backoff, not leased"
        );
        let row = |index: usize| {
            let (owner, id) = (rows[index].organization_id, rows[index].id);
            async move { store.get_instance(owner, id).await.unwrap().unwrap() }
        };
        let expedited = row(0).await;
        assert_eq!(expedited.next_due_at, Some(now), "[{label}]");
        assert_eq!(expedited.backoff_until, None, "[{label}]");
        assert!(
            expedited.failing_since.is_some(),
            "[{label}] still failing until it refreshes"
        );
        assert_eq!(
            row(1).await.next_due_at,
            Some(NOW + 900_000),
            "[{label}] beyond the horizon"
        );
        assert_eq!(
            row(3).await.next_due_at,
            Some(NOW + 60_000),
            "[{label}] another connector"
        );
        assert_eq!(
            row(4).await.next_due_at,
            Some(NOW + 60_000),
            "[{label}] another organization"
        );
        // A built-in connector: every organization's instances of it.
        let moved = store
            .expedite_backoffs(None, "acme", now, 300_000)
            .await
            .unwrap();
        assert_eq!(moved, 1, "[{label}] the other organization's one");
        assert_eq!(row(4).await.next_due_at, Some(now), "[{label}]");
        for index in [5, 6, 7] {
            assert_eq!(
                row(index).await.next_due_at,
                Some(NOW + 60_000),
                "[{label}] {} keeps its wait",
                rows[index].name
            );
        }
    }
}

/// Events past the retention go, in batches, except those still waiting to be delivered.
#[tokio::test]
async fn old_events_are_purged_but_not_those_waiting_for_delivery() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let day = 86_400_000;
        let mut old = Vec::new();
        for n in 0..3 {
            let recorded = event(org, 1, "instance.token.refreshed", NOW - 40 * day - n);
            store.insert_event(&recorded).await.unwrap();
            old.push(recorded.id);
        }
        let mut waiting = event(org, 1, "instance.invalidated", NOW - 40 * day);
        waiting.delivery_state = DeliveryState::Pending;
        waiting.next_attempt_at = Some(NOW);
        store.insert_event(&waiting).await.unwrap();
        let recent = event(org, 1, "instance.token.refreshed", NOW - day);
        store.insert_event(&recent).await.unwrap();

        let before = NOW - 30 * day;
        assert_eq!(
            store.purge_old_events(before, 2).await.unwrap(),
            2,
            "[{label}]"
        );
        assert_eq!(
            store.purge_old_events(before, 2).await.unwrap(),
            1,
            "[{label}]"
        );
        assert_eq!(
            store.purge_old_events(before, 2).await.unwrap(),
            0,
            "[{label}]"
        );
        for id in &old {
            assert_eq!(store.get_event(org, id).await.unwrap(), None, "[{label}]");
        }
        assert!(
            store.get_event(org, &waiting.id).await.unwrap().is_some(),
            "[{label}]"
        );
        assert!(
            store.get_event(org, &recent.id).await.unwrap().is_some(),
            "[{label}]"
        );
        test.cleanup().await;
    }
}

/// A refresh asked for now ends a backoff of the service's own making and one after the app's
/// credentials were refused (fixable at the provider), not one the provider asked for, nor
/// one for a configuration no fix at the provider can mend (a connector gone).
#[tokio::test]
async fn a_refresh_asked_for_now_ends_only_the_backoffs_it_may() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let misconfigured = tokenwarden::refresh::MISCONFIGURED_TEXT;
        for (failure, ends) in [
            ("the provider answered HTTP 503".to_string(), true),
            (
                format!(
                    "{misconfigured}: {} (invalid_client: bad secret); fix `oauth.api.key` and `oauth.api.secret`",
                    tokenwarden::refresh::CLIENT_REFUSED_TEXT
                ),
                true,
            ),
            (format!("{misconfigured}: connector acme is gone"), false),
            (
                format!(
                    "{} (HTTP 429), retry after 60 s",
                    tokenwarden::oauth::RATE_LIMITED_TEXT
                ),
                false,
            ),
        ] {
            let row = instance(org, &failure);
            store.insert_instance(&row, None).await.unwrap();
            assert!(
                store
                    .record_transient_failure(
                        row.id,
                        "me",
                        NOW,
                        &failure,
                        NOW + 60_000,
                        None,
                        None,
                        None
                    )
                    .await
                    .unwrap()
            );
            assert_eq!(
                store.end_transient_backoff(row.id).await.unwrap(),
                ends,
                "[{label}] {failure}"
            );
        }
        test.cleanup().await;
    }
}

/// The invalidations' leases: one by the holder (a revocation) keeps its hold's lease, so that
/// nothing else writes while the provider is asked; one after a revival (`unleased`) writes
/// only when no other process holds the lease (its work decides), ends its own, and is free to
/// write over a lease that ran out.
#[tokio::test]
async fn invalidations_keep_or_respect_leases_as_they_say() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "leases").await;
        let wall = tokenwarden::app::now_ms();
        let lease = |row: &InstanceRow| (row.refresh_lease_owner.clone(), row.refresh_lease_until);

        // Held by a revocation: invalid, the lease still the hold's.
        let held = instance(org, "held");
        store.insert_instance(&held, None).await.unwrap();
        let taken = store
            .try_acquire_refresh_lease(held.id, "holder", wall, wall + 60_000, false)
            .await
            .unwrap()
            .expect("free");
        assert!(
            store
                .mark_invalid_held(held.id, "revoked", None, None, taken.token_version, true)
                .await
                .unwrap(),
            "[{label}]"
        );
        let now = store.get_instance_by_id(held.id).await.unwrap().unwrap();
        assert!(!now.is_valid(), "[{label}] {now:?}");
        assert_eq!(
            lease(&now),
            (Some("holder".to_string()), Some(wall + 60_000)),
            "[{label}] the hold keeps its lease"
        );
        assert_eq!(
            now.token_version,
            taken.token_version + 1,
            "[{label}] retired"
        );

        // Another process's live lease: not written.
        let other = instance(org, "other's");
        store.insert_instance(&other, None).await.unwrap();
        let taken = store
            .try_acquire_refresh_lease(other.id, "replica-b", wall, wall + 60_000, true)
            .await
            .unwrap()
            .expect("free");
        let refused = NewEvent {
            reason: Some("refused".into()),
            ..event(org, other.id, "instance.invalidated", wall)
        };
        assert!(
            !store
                .mark_invalid_unleased(
                    other.id,
                    "replica-a",
                    "refused",
                    None,
                    Some(&refused),
                    taken.token_version
                )
                .await
                .unwrap(),
            "[{label}] written under another process's lease"
        );
        let now = store.get_instance_by_id(other.id).await.unwrap().unwrap();
        assert!(now.is_valid(), "[{label}] {now:?}");
        assert_eq!(
            lease(&now),
            (Some("replica-b".to_string()), Some(wall + 60_000)),
            "[{label}]"
        );
        assert!(
            events_of(store, org, other.id).await.is_empty(),
            "[{label}] the event of a change not made"
        );

        // Its own lease: written, and ended.
        let own = instance(org, "own");
        store.insert_instance(&own, None).await.unwrap();
        let taken = store
            .try_acquire_refresh_lease(own.id, "replica-a", wall, wall + 60_000, true)
            .await
            .unwrap()
            .expect("free");
        let event = event(org, own.id, "instance.invalidated", wall);
        assert!(
            store
                .mark_invalid_unleased(
                    own.id,
                    "replica-a",
                    "refused",
                    Some("401"),
                    Some(&event),
                    taken.token_version
                )
                .await
                .unwrap(),
            "[{label}]"
        );
        let now = store.get_instance_by_id(own.id).await.unwrap().unwrap();
        assert!(!now.is_valid(), "[{label}] {now:?}");
        assert_eq!(lease(&now), (None, None), "[{label}]");
        assert!(now.refresh_in_flight_since.is_none(), "[{label}] {now:?}");
        assert_eq!(
            events_of(store, org, own.id).await,
            ["instance.invalidated"],
            "[{label}]"
        );

        // Another's lease that ran out: written (a dead replica's lease does not protect),
        // and left for its owner to find gone.
        let expired = instance(org, "expired");
        store.insert_instance(&expired, None).await.unwrap();
        let taken = store
            .try_acquire_refresh_lease(expired.id, "replica-b", wall - 60_000, wall - 30_000, true)
            .await
            .unwrap()
            .expect("free");
        assert!(
            store
                .mark_invalid_unleased(
                    expired.id,
                    "replica-a",
                    "refused",
                    None,
                    None,
                    taken.token_version
                )
                .await
                .unwrap(),
            "[{label}]"
        );
        let now = store.get_instance_by_id(expired.id).await.unwrap().unwrap();
        assert!(!now.is_valid(), "[{label}] {now:?}");

        // A version moved on: not written.
        let moved = instance(org, "moved");
        store.insert_instance(&moved, None).await.unwrap();
        assert!(
            !store
                .mark_invalid_unleased(
                    moved.id,
                    "replica-a",
                    "refused",
                    None,
                    None,
                    moved.token_version - 1
                )
                .await
                .unwrap(),
            "[{label}]"
        );
        test.cleanup().await;
    }
}

/// SQLite with no room to grow (a full disk, here its page limit): each write says it failed,
/// and once there is room the store writes again. A write that answered with its row before
/// SQLite had stored it (`UPDATE … RETURNING` read for one row) reported the change made, and a
/// failed transaction left the one connection unable to begin another until a restart.
#[tokio::test]
async fn a_full_sqlite_database_fails_writes_and_recovers() {
    let url = crate::support::sqlite_database();
    let store = Store::connect(&url).await.unwrap();
    let org = organization(&store, "full").await;
    let row = instance(org, "full");
    store.insert_instance(&row, None).await.unwrap();
    let pool = store.pool().clone();
    let limit = async |pages: i64| {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA max_page_count = {pages}"
        )))
        .execute(&pool)
        .await
        .unwrap();
    };
    let (pages,): (i64,) = sqlx::query_as("PRAGMA page_count")
        .fetch_one(store.pool())
        .await
        .unwrap();
    limit(pages).await;
    let big = format!("{{\"note\": \"{}\"}}", "x".repeat(200_000));
    let updated = store
        .update_instance_metadata(org, row.id, "renamed", "[]", &big, None, None, false)
        .await;
    // A passing state of the database, like one that does not answer: refreshed tokens are
    // kept for it, and callers are answered 503.
    assert!(
        matches!(updated, Err(StoreError::Unavailable(_))),
        "a write with no room: {updated:?}"
    );
    let mut event = event(org, row.id, "instance.invalidated", NOW);
    event.payload = big.clone();
    let invalidated = store
        .mark_invalid(row.id, "gone", None, Some(&event), None, false)
        .await;
    assert!(
        matches!(invalidated, Err(StoreError::Unavailable(_))),
        "{invalidated:?}"
    );
    let stored = store.get_instance_by_id(row.id).await.unwrap().unwrap();
    assert_eq!(stored.name, row.name);
    assert!(stored.is_valid());
    // Room again: writes, in and out of transactions.
    limit(1_000_000).await;
    let updated = store
        .update_instance_metadata(org, row.id, "renamed", "[]", &big, None, None, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert!(
        store
            .mark_invalid(row.id, "gone", None, Some(&event), None, false)
            .await
            .unwrap()
    );
    store.close().await;
    drop_test_database(&url).await;
}

/// A write outside a transaction whose failure SQLite reports only at the statement's end (here
/// a deferred constraint, checked as the statement commits; a full disk's log write is another)
/// says it failed. Read for its first `RETURNING` row only, it answered the row, and a PATCH
/// answered 200 with nothing stored.
#[tokio::test]
async fn a_write_refused_at_its_end_is_no_change() {
    let url = crate::support::sqlite_database();
    let store = Store::connect(&url).await.unwrap();
    let org = organization(&store, "deferred").await;
    let row = instance(org, "deferred");
    store.insert_instance(&row, None).await.unwrap();
    for statement in [
        "CREATE TABLE trap_parent (id INTEGER PRIMARY KEY)",
        "CREATE TABLE trap (parent INTEGER REFERENCES trap_parent(id) DEFERRABLE INITIALLY DEFERRED)",
        "CREATE TRIGGER trap_rename AFTER UPDATE OF name ON instances WHEN NEW.name = 'trapped' \
         BEGIN INSERT INTO trap VALUES (42); END",
    ] {
        sqlx::query(statement).execute(store.pool()).await.unwrap();
    }
    let updated = store
        .update_instance_metadata(org, row.id, "trapped", "[]", "{}", None, None, false)
        .await;
    assert!(updated.is_err(), "{updated:?}");
    let stored = store.get_instance_by_id(row.id).await.unwrap().unwrap();
    assert_eq!(stored.name, row.name);
    store.close().await;
    drop_test_database(&url).await;
}

/// A claim of a code or of imported tokens (`used_codes`) is given back only as its releaser
/// saw it: not marked yet (`None`: a failed exchange or create), or marked with the instance
/// it found deleted. Two repeats of an import whose instance was deleted both gave the claim
/// back, the second giving back the claim the first had just taken anew, and both imported
/// the tokens.
#[tokio::test]
async fn claims_are_given_back_as_they_were_seen() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let hour = NOW + 3_600_000;
        let key = bytes(&format!("import-{}", random_id()));
        assert!(
            store.claim_code(&key, org, hour).await.unwrap(),
            "[{label}]"
        );
        store.code_landed(&key, 41).await.unwrap();
        // The first repeat finds instance 41 deleted, gives the claim back and claims anew;
        // the second, which found the same, gives nothing back.
        assert!(
            store.release_code(&key, Some(41)).await.unwrap(),
            "[{label}]"
        );
        assert!(
            store.claim_code(&key, org, hour).await.unwrap(),
            "[{label}]"
        );
        assert!(
            !store.release_code(&key, Some(41)).await.unwrap(),
            "[{label}] the new claim stays"
        );
        assert!(
            store.used_code(&key, NOW).await.unwrap().is_some(),
            "[{label}]"
        );
        // Marked by an insert, a claim is not given back as an unmarked one.
        store.code_landed(&key, 42).await.unwrap();
        assert!(!store.release_code(&key, None).await.unwrap(), "[{label}]");
        assert!(
            !store.release_code(&key, Some(0)).await.unwrap(),
            "[{label}]"
        );
        assert!(
            store.release_code(&key, Some(42)).await.unwrap(),
            "[{label}]"
        );
        assert!(
            store.claim_code(&key, org, hour).await.unwrap(),
            "[{label}]"
        );
        assert!(store.release_code(&key, None).await.unwrap(), "[{label}]");

        test.cleanup().await;
    }
}

/// An import refreshed before its answer is inserted under its refresh's lease, its
/// `instance.created` held back from delivery until the refresh's outcome is known; refused at
/// that refresh, it is removed whole (row, events, the claim of its tokens), and only under
/// that lease at its version; refreshed, its event is let go by `release_held_event`.
#[tokio::test]
async fn a_refused_import_is_removed_whole_and_a_kept_one_s_event_let_go() {
    for test in test_stores().await {
        let store = &test.store;
        let label = &test.label;
        let org = organization(store, "A").await;
        let hour = NOW + 3_600_000;
        // An import refreshed before its answer: inserted under its refresh's lease, its
        // `instance.created` held back, its claim marked with it.
        let held = |row: &InstanceRow| {
            let mut created = event(org, row.id, "instance.created", NOW);
            created.delivery_state = DeliveryState::Pending;
            created.next_attempt_at = Some(NOW + 70_000);
            created
        };
        let leased = |name: &str| InstanceRow {
            refresh_lease_owner: Some("replica-a".to_string()),
            refresh_lease_until: Some(NOW + 10_000),
            refresh_in_flight_since: Some(NOW),
            ..instance(org, name)
        };
        let refused = leased("refused");
        let claim = bytes(&format!("import-{}", random_id()));
        assert!(store.claim_code(&claim, org, hour).await.unwrap());
        assert!(
            store
                .insert_instance_of(&refused, Some(&held(&refused)), false, Some(&claim))
                .await
                .unwrap()
        );
        assert!(
            store
                .claim_pending_deliveries(NOW + 1_000, 10, NOW + 60_000, 4, &[])
                .await
                .unwrap()
                .is_empty(),
            "[{label}] held back"
        );
        for (owner, version) in [
            ("replica-b", refused.token_version),
            ("replica-a", refused.token_version + 1),
        ] {
            assert!(
                !store
                    .remove_refused_import(refused.id, owner, version)
                    .await
                    .unwrap(),
                "[{label}] {owner} {version}"
            );
        }
        assert!(
            store
                .remove_refused_import(refused.id, "replica-a", refused.token_version)
                .await
                .unwrap(),
            "[{label}]"
        );
        assert!(
            store
                .get_instance_by_id(refused.id)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            events_of(store, org, refused.id).await.is_empty(),
            "[{label}]"
        );
        assert!(
            store.used_code(&claim, NOW).await.unwrap().is_none(),
            "[{label}] the tokens may be imported again"
        );

        // Refreshed: its `instance.created` goes out at once, and only once let go.
        let kept = leased("kept");
        let created = held(&kept);
        assert!(
            store
                .insert_instance_of(&kept, Some(&created), false, None)
                .await
                .unwrap()
        );
        assert!(
            !store
                .release_held_event(&created.id, NOW + 1, NOW + 1_000)
                .await
                .unwrap(),
            "[{label}] not held until then"
        );
        assert!(
            store
                .release_held_event(&created.id, NOW + 70_000, NOW + 1_000)
                .await
                .unwrap(),
            "[{label}]"
        );
        let claimed = store
            .claim_pending_deliveries(NOW + 1_000, 10, NOW + 60_000, 4, &[])
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "[{label}]");
        assert_eq!(claimed[0].id, created.id, "[{label}]");
        assert!(
            !store
                .release_held_event(&created.id, NOW + 70_000, NOW + 2_000)
                .await
                .unwrap(),
            "[{label}] claimed already"
        );
        test.cleanup().await;
    }
}
