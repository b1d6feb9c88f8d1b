//! Multipart uploads cut by the rule of `s3/upload.rs` (the part size grows with the file, so
//! that no file needs more parts than allowed), against SeaweedFS through the test proxy,
//! which counts the parts as they go by. With S3's 10,000 parts the growth starts at 78 GiB,
//! too much for a test: [`S3Backend::with_multipart_limits`] allows 3 parts instead, and a
//! 40 MiB file must then go in 3 parts of 14 MiB, not 6 of 8 MiB.

#![cfg(feature = "s3")]

#[path = "support/fault_proxy.rs"]
mod fault_proxy;
#[path = "support/testbeds.rs"]
mod testbeds;

use std::io::Write as _;

use futures::TryStreamExt as _;
use nixpush_backends::s3::{MIN_PART_SIZE, S3Backend, S3Config, S3Credentials};
use nixpush_backends::{Backend, Body, PutMode, PutOptions};

/// 40 MiB and a bit, not compressible, different for each `seed`.
fn data(seed: u64) -> Vec<u8> {
    let len = (40 << 20) + 12345;
    let mut v = Vec::with_capacity(len + 8);
    let mut x = seed;
    while v.len() < len {
        x = fault_proxy::mix(x);
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The sizes of the parts the proxy saw go up to `key`, in part order.
fn part_sizes(proxy: &fault_proxy::FaultProxy, key: &str) -> Vec<usize> {
    let mut parts: Vec<(u32, usize)> = proxy
        .records()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path().ends_with(key) && r.status == Some(200))
        .filter_map(|r| {
            let query = r.target.split_once('?')?.1.to_owned();
            let n = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("partNumber="))?
                .parse()
                .ok()?;
            Some((n, r.body_len))
        })
        .collect();
    parts.sort();
    parts.into_iter().map(|(_, len)| len).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_part_size_grows_so_that_a_file_fits_in_the_parts_allowed() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = fault_proxy::FaultProxy::start(
        sw.s3_port,
        Box::new(|_, _| fault_proxy::Fault::Pass),
        fault_proxy::Options::default(),
        &dir.path().join("proxy.log"),
    );
    let prefix = testbeds::unique("multipart");
    let config = S3Config::parse(&format!(
        "s3://{}/{prefix}?endpoint={}&region={}",
        testbeds::PUBLIC_BUCKETS[0],
        proxy.endpoint(),
        testbeds::S3_REGION
    ))
    .expect("address");
    let keys = || S3Credentials::Static {
        key_id: testbeds::S3_ACCESS_KEY.into(),
        secret_key: testbeds::S3_SECRET_KEY.into(),
        token: None,
    };
    let default = S3Backend::new(config.clone(), keys()).await.expect("open");
    let three = S3Backend::new(config, keys())
        .await
        .expect("open")
        .with_multipart_limits(0, 3);

    let mib = 1 << 20;
    for (backend, key, seed, want) in [
        // 8 MiB parts: six of them.
        (
            &default,
            "nar/default.nar",
            1,
            vec![8 * mib, 8 * mib, 8 * mib, 8 * mib, 8 * mib, 12345],
        ),
        // Three parts allowed: ceil(40 MiB + 12345 / 3), rounded up to a MiB, is 14 MiB.
        (
            &three,
            "nar/three.nar",
            2,
            vec![14 * mib, 14 * mib, 12 * mib + 12345],
        ),
    ] {
        let bytes = data(seed);
        let mut f = tempfile::NamedTempFile::new_in(dir.path()).expect("temp file");
        f.write_all(&bytes).expect("write");
        let staged = f.into_temp_path();
        backend
            .put(
                key,
                Body::File(staged),
                PutOptions {
                    mode: PutMode::Overwrite,
                    content_type: "application/x-nix-nar",
                },
            )
            .await
            .expect("multipart put");
        let sizes = part_sizes(&proxy, key);
        eprintln!("{key}: {} parts of {sizes:?} bytes", sizes.len());
        assert_eq!(sizes, want, "{key}");
        assert_eq!(sizes.iter().sum::<usize>(), bytes.len());
        let back: Vec<u8> = backend
            .get(key)
            .await
            .expect("get")
            .try_fold(Vec::new(), |mut v, c| async move {
                v.extend_from_slice(&c);
                Ok(v)
            })
            .await
            .expect("read back");
        assert!(back == bytes, "{key} came back different");
    }
    assert_eq!(MIN_PART_SIZE, 8 * mib as u64);
}
