//! A SQLite file that could not be written for a while (made immutable, a mount remounted
//! read-only) is written again once it can be, without a restart: SQLite had opened it again
//! read-only meanwhile, and that connection refused every write until the process restarted
//! (the rotated tokens kept for it were lost with the restart).
//!
//! A test binary of its own: the store's record of refused writes is the process's (one
//! service per process), and the refused writes here would make the health checks of other
//! tests' services in the same process answer 503.

use tokenwarden::store::Store;

#[tokio::test]
async fn a_sqlite_file_read_only_for_a_while_is_written_again() {
    let path =
        std::env::temp_dir().join(format!("tokenwarden-read-only-{}.db", std::process::id()));
    let path = path.display().to_string();
    let url = format!("sqlite://{path}");
    let store = Store::connect(&url).await.unwrap();
    store.replica_seen("probe", 1, "key").await.unwrap();
    let files: Vec<String> = ["", "-wal"]
        .iter()
        .map(|suffix| format!("{path}{suffix}"))
        .collect();
    let chattr = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .args(&files)
            .status()
            .is_ok_and(|status| status.success())
    };
    // Writable again whatever happens below (a failed assertion included).
    struct Writable(Vec<String>);
    impl Drop for Writable {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .args(&self.0)
                .status();
            for file in &self.0 {
                let _ = std::fs::remove_file(file);
            }
            let _ = std::fs::remove_file(format!("{}-shm", self.0[0]));
        }
    }
    let _writable = Writable(files.clone());
    if !chattr("+i") {
        // Not root, or a file system without the flag: nothing to check here.
        eprintln!("chattr +i is not available: the read-only SQLite file is not checked");
        return;
    }
    // The connection is opened again while the file cannot be written (what a write whose
    // rollback failed makes the pool do): SQLite opens it read-only.
    let connection = store.pool().acquire().await.unwrap();
    connection.close().await.unwrap();
    assert!(
        store.replica_seen("probe", 2, "key").await.is_err(),
        "written to an immutable file"
    );
    assert!(chattr("-i"), "chattr -i");
    let mut answers = Vec::new();
    for at in 3..6 {
        let written = store.replica_seen("probe", at, "key").await;
        answers.push(written.as_ref().map_err(ToString::to_string).err());
        if written.is_ok() {
            break;
        }
    }
    assert_eq!(
        answers.last(),
        Some(&None),
        "the file can be written again, the store does not: {answers:?}"
    );
    store.close().await;
}
