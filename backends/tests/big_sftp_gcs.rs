//! The conformance suite (`support/suite.rs`) on SFTP (OpenSSH's sshd) and GCS
//! (fake-gcs-server): among the rest, a staged file over 100 MiB goes up and comes back intact
//! while this process's peak memory grows by less than half of it, is overwritten by another
//! and refused to a creator; and of eight writers creating one key exactly one wins.
//!
//! A test binary of its own, with its tests serialized, so that the memory measured is the
//! transfer's and nothing else's (the SFTP and GCS tests in `conformance_sftp_gcs.rs` read
//! objects of 20 MiB whole).

// Needs both backends compiled in (the default).
#![cfg(all(feature = "sftp", feature = "gcs"))]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use nixpush_backends::BackendExt as _;
use nixpush_backends::gcs::{GcsBackend, GcsConfig};

use support::suite::*;
use support::testbeds as tb;

/// One test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_conformance() {
    let _serial = SERIAL.lock().await;
    let Some(sshd) = tb::sshd() else { return };
    let dir = sshd.fresh_dir("suite");
    let b = nixpush_backends::open(&sshd.address(&dir))
        .await
        .expect("open");
    suite(
        b.clone(),
        Caps {
            big_rewrite: true,
            ..FULL
        },
    )
    .await;
    // No file is left on the server that is not an object (listing hides temporary files).
    let listed: BTreeSet<String> = b.list("").await.unwrap().into_iter().collect();
    let on_disk: BTreeSet<String> = files_below(&dir).into_iter().collect();
    assert_eq!(on_disk, listed, "files left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_conformance_under_a_prefix() {
    let _serial = SERIAL.lock().await;
    let Some(g) = tb::fake_gcs() else { return };
    g.create_bucket("big");
    // Listing pages of four entries, so that the suite's objects take several.
    let b =
        GcsBackend::new(GcsConfig::parse(&g.address("big", &tb::unique("p"))).expect("address"))
            .expect("open")
            .with_list_page_size(4);
    suite(
        Arc::new(b),
        Caps {
            big_rewrite: true,
            list_page: Some(4),
            ..FULL
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_conformance_at_a_bucket_root() {
    let _serial = SERIAL.lock().await;
    let Some(g) = tb::fake_gcs() else { return };
    let bucket = tb::unique("root").to_lowercase();
    g.create_bucket(&bucket);
    let b = nixpush_backends::open(&g.address(&bucket, ""))
        .await
        .expect("open");
    suite(
        b,
        Caps {
            list_page: Some(1000),
            ..FULL
        },
    )
    .await;
}
