//! The conformance suite (`support/suite.rs`) run against a local directory, SeaweedFS over S3
//! and nginx over HTTP PUT (SFTP and GCS run it in `big_sftp_gcs.rs`). The servers are started
//! once per test binary on loopback by `support/testbeds.rs`; every test works under its own
//! fresh prefix or bucket, so the tests run in parallel.
//!
//! Errors that need a broken setup (wrong credentials, a missing bucket, a closed port) have a
//! test per backend.

// The suite needs every backend; a build without one of them has nothing to run here.
#![cfg(all(feature = "fs", feature = "s3", feature = "http"))]

mod support;

use std::sync::Arc;

use nixpush_backends::fs::FsBackend;
use nixpush_backends::http::{HttpAuth, HttpBackend, HttpConfig};
use nixpush_backends::s3::{S3Backend, S3Config, S3Credentials};
use nixpush_backends::{Backend, BackendExt as _, Body, ErrorKind, OpenError, PutMode};
use support::suite::*;
use support::testbeds::{self, unique};

// ---------------------------------------------------------------------------------------------
// Backends on their servers.

fn s3_config(sw: &testbeds::SeaweedFs, bucket: &str, prefix: &str) -> S3Config {
    S3Config::parse(&sw.address(bucket, prefix)).expect("S3 address")
}

fn test_keys() -> S3Credentials {
    S3Credentials::Static {
        key_id: testbeds::S3_ACCESS_KEY.into(),
        secret_key: testbeds::S3_SECRET_KEY.into(),
        token: None,
    }
}

async fn s3(sw: &testbeds::SeaweedFs, bucket: &str, prefix: &str) -> Arc<dyn Backend> {
    Arc::new(
        S3Backend::new(s3_config(sw, bucket, prefix), test_keys())
            .await
            .expect("open S3 backend"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_conformance() {
    let dir = tempfile::tempdir().expect("temp dir");
    let b = FsBackend::new(dir.path().join("cache"))
        .await
        .expect("open fs");
    suite(Arc::new(b), FULL).await;
}

/// Listing pages of four entries, so that the suite's objects take several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_conformance_under_a_prefix() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    sw.create_bucket("conformance");
    let b = S3Backend::new(
        s3_config(sw, "conformance", &unique("suite/prefixed")),
        test_keys(),
    )
    .await
    .expect("open S3 backend")
    .with_list_page_size(4);
    suite(
        Arc::new(b),
        Caps {
            list_page: Some(4),
            ..FULL
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_conformance_at_a_bucket_root() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let bucket = unique("root").to_lowercase();
    sw.create_bucket(&bucket);
    suite(
        s3(sw, &bucket, "").await,
        Caps {
            list_page: Some(1000),
            ..FULL
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_conformance() {
    let Some(ngx) = testbeds::nginx() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{}\n", testbeds::HTTP_TOKEN)).expect("write token");
    let path = unique("suite");
    let addr = format!("{}?token-file={}", ngx.url(&path), token.display());
    let b = nixpush_backends::open(&addr).await.expect("open http");
    suite(
        b,
        Caps {
            list: false,
            exact_create_race: false,
            ..FULL
        },
    )
    .await;
    // Every upload announced its length (streamed files too), none was chunked.
    let log = ngx.access_log();
    let puts: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with(&format!("PUT /{path}/")))
        .collect();
    assert!(puts.len() > 10, "too few uploads logged:\n{log}");
    for l in &puts {
        assert!(
            l.ends_with("transfer-encoding=-") && !l.contains("length=- "),
            "an upload without Content-Length: {l}"
        );
    }
    let big = format!("PUT /{path}/nar/big.nar 201 length={BIG_LEN} ");
    assert!(
        puts.iter().any(|l| l.starts_with(&big)),
        "no {big:?} in\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors that need a broken setup.

#[tokio::test]
async fn s3_wrong_secret_is_permission() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    sw.create_bucket("conformance");
    let prefix = unique("wrong-secret");
    let good = s3(sw, "conformance", &prefix).await;
    good.put("present", Body::Bytes("x".into()), opts(PutMode::Overwrite))
        .await
        .expect("put with the right keys");
    let bad = S3Backend::new(
        s3_config(sw, "conformance", &prefix),
        S3Credentials::Static {
            key_id: testbeds::S3_ACCESS_KEY.into(),
            secret_key: "not-the-secret".into(),
            token: None,
        },
    )
    .await
    .expect("open");
    let unknown_key = S3Backend::new(
        s3_config(sw, "conformance", &prefix),
        S3Credentials::Static {
            key_id: "no-such-key".into(),
            secret_key: "whatever".into(),
            token: None,
        },
    )
    .await
    .expect("open");
    for b in [&bad, &unknown_key] {
        expect_kind(b.exists("present").await, ErrorKind::Permission, "exists");
        expect_ops_fail(b, ErrorKind::Permission, "present").await;
    }
    assert!(
        good.exists("present").await.unwrap(),
        "a refused delete deleted"
    );
}

/// A missing bucket is `ErrorKind::Config` (the address is wrong) for get, put, list and
/// delete; `exists` answers false, as a HEAD response cannot say which is missing.
#[tokio::test]
async fn s3_missing_bucket_is_config() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let b = s3(sw, "no-such-bucket-here", "").await;
    expect_ops_fail(&*b, ErrorKind::Config, "k").await;
    let staged = Pattern::new(9, 20 << 20).staged(&*b);
    expect_kind(
        b.put("big", Body::File(staged), opts(PutMode::Overwrite))
            .await,
        ErrorKind::Config,
        "multipart upload into a missing bucket",
    );
    assert!(!b.exists("k").await.unwrap());
    let e = b.get("k").await.map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("NoSuchBucket"), "{e}");
}

#[tokio::test]
async fn s3_unreachable_server_is_transient() {
    let port = testbeds::closed_port();
    let config = S3Config::parse(&format!("s3://bucket?endpoint=http://127.0.0.1:{port}")).unwrap();
    let b = S3Backend::new(config, test_keys()).await.unwrap();
    let started = std::time::Instant::now();
    expect_kind(b.exists("k").await, ErrorKind::Transient, "exists");
    expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Create))
            .await,
        ErrorKind::Transient,
        "put",
    );
    expect_kind(b.get("k").await.map(|_| ()), ErrorKind::Transient, "get");
    expect_kind(b.list("").await, ErrorKind::Transient, "list");
    // Retries are bounded: a dead cache is reported within seconds, not minutes.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn s3_unknown_profile_is_config() {
    // The named-profile path of the credential chain, without any network: aws-config reads
    // the profile files only.
    let port = testbeds::closed_port();
    let r = nixpush_backends::open(&format!(
        "s3://bucket?endpoint=http://127.0.0.1:{port}&profile=nixpush-no-such-profile-7c1"
    ))
    .await;
    match r {
        Ok(b) => {
            let e = b.exists("k").await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Config, "{e}");
            assert!(e.to_string().contains("nixpush-no-such-profile-7c1"), "{e}");
        }
        // Without aws-config, a profile cannot be used, and opening says why.
        Err(OpenError::Invalid(_, m)) if cfg!(not(feature = "s3-aws-config")) => {
            assert!(m.contains("s3-aws-config"), "{m}");
        }
        Err(e) => panic!("open: {e}"),
    }
}

#[tokio::test]
async fn http_wrong_token_is_permission() {
    let Some(ngx) = testbeds::nginx() else { return };
    let base = ngx.url(&unique("auth"));
    let config = |auth| HttpConfig {
        base: url::Url::parse(&base).unwrap(),
        auth,
    };
    let good = HttpBackend::new(config(HttpAuth::Bearer(testbeds::HTTP_TOKEN.into()))).unwrap();
    good.put("present", Body::Bytes("x".into()), opts(PutMode::Overwrite))
        .await
        .expect("put with the token");
    for auth in [
        HttpAuth::Bearer("wrong-token".into()),
        HttpAuth::None,
        HttpAuth::Basic {
            user: "u".into(),
            password: testbeds::HTTP_TOKEN.into(),
        },
    ] {
        let what = format!("{auth:?}");
        assert!(!what.contains(testbeds::HTTP_TOKEN) && !what.contains("wrong-token"));
        let b = HttpBackend::new(config(auth)).unwrap();
        expect_kind(
            b.put("k", Body::Bytes("x".into()), opts(PutMode::Overwrite))
                .await,
            ErrorKind::Permission,
            &format!("put with {what}"),
        );
        expect_kind(
            b.put(
                "k2",
                Body::File(Pattern::new(10, 300_000).staged(&b)),
                opts(PutMode::Create),
            )
            .await,
            ErrorKind::Permission,
            &format!("put file with {what}"),
        );
        expect_kind(b.delete("present").await, ErrorKind::Permission, &what);
        // Reading is open on this server.
        assert!(b.exists("present").await.unwrap());
        assert!(!b.exists("k").await.unwrap());
    }
    assert!(good.exists("present").await.unwrap());
}

#[tokio::test]
async fn http_unreachable_server_is_transient() {
    let port = testbeds::closed_port();
    let b = nixpush_backends::open(&format!("http://127.0.0.1:{port}/cache"))
        .await
        .unwrap();
    expect_kind(b.exists("k").await, ErrorKind::Transient, "exists");
    expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Overwrite))
            .await,
        ErrorKind::Transient,
        "put",
    );
    expect_kind(b.get("k").await.map(|_| ()), ErrorKind::Transient, "get");
    expect_kind(b.delete("k").await, ErrorKind::Transient, "delete");
}

#[tokio::test]
async fn open_names_what_is_wrong_with_an_address() {
    expect_invalid(
        "s3://bucket?endpoint=http://127.0.0.1:1&bogus=1",
        "\"bogus\"",
    )
    .await;
    expect_invalid(
        "s3://bucket?narinfo-compression=xz",
        "\"narinfo-compression\"",
    )
    .await;
    expect_invalid("http://127.0.0.1:1/c?bogus=1", "\"bogus\"").await;
    expect_invalid(
        "https://h/c?token-file=/nonexistent/token",
        "/nonexistent/token",
    )
    .await;
    match nixpush_backends::open("gopher://h/c").await {
        Err(e @ OpenError::UnsupportedScheme(..)) => {
            let m = e.to_string();
            for s in ["file://", "s3://", "http://", "https://"] {
                assert!(m.contains(s), "{m}");
            }
        }
        other => panic!("gopher: {other:?}"),
    }
}
