//! The real `shoal` binary as a child process: crash safety under `kill -9`, and the CLI's
//! handling of bad configuration.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_node::origin::Origin;
use shoal_protocol::Digest;
use shoal_tests::{pseudo_random, shoal_bin};

fn spawn(dir: &std::path::Path, upstream: &str, port: u16) -> Child {
    Command::new(shoal_bin())
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir)
        .args(["--upstream", upstream])
        .env("SHOAL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("shoal binary runs")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/v2/")).await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("shoal did not become ready");
}

fn kill9(child: &mut Child) {
    // SIGKILL, as `kill -9`: no chance to clean up.
    child.kill().expect("kill");
    child.wait().expect("reap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_pull_leaves_a_store_that_serves_only_verified_content() {
    let origin = Origin::start().await.unwrap();
    let blobs: Vec<(Digest, Vec<u8>)> = (0..3)
        .map(|i| {
            let data = pseudo_random(24 << 20, 100 + i);
            (origin.put_blob(data.clone()), data)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn(dir.path(), &origin.url(), port);
    wait_ready(port).await;

    // The first blob completes; the others are killed mid-transfer, at different points.
    let http = reqwest::Client::new();
    let url = |d: &Digest| format!("http://127.0.0.1:{port}/v2/x/blobs/{d}");
    assert_eq!(
        http.get(url(&blobs[0].0))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        blobs[0].1
    );
    let mut resp = http.get(url(&blobs[1].0)).send().await.unwrap();
    let mut got = 0usize;
    while got < (4 << 20) {
        match resp.chunk().await.unwrap() {
            Some(c) => got += c.len(),
            None => break,
        }
    }
    let pending = http.get(url(&blobs[2].0)).send();
    let _ = tokio::time::timeout(Duration::from_millis(20), pending).await;
    kill9(&mut child);
    drop(resp);

    // Restart on the same data dir with the upstream gone: only verified content is served.
    origin.stop();
    let mut child = spawn(dir.path(), "http://127.0.0.1:9", port);
    wait_ready(port).await;
    for (i, (d, data)) in blobs.iter().enumerate() {
        let r = http.get(url(d)).send().await.unwrap();
        if i == 0 {
            assert_eq!(r.status(), 200);
            let body = r.bytes().await.unwrap();
            assert_eq!(Digest::of(&body), *d);
            assert_eq!(&body[..], &data[..]);
        } else {
            // Never served partially: either an error status, or an aborted body.
            if r.status() == 200 {
                let body = r.bytes().await;
                assert!(
                    body.is_err() || Digest::of(&body.unwrap()) == *d,
                    "unverified bytes served for blob {i}"
                );
            }
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("partial"))
            .unwrap()
            .count(),
        0,
        "partials dropped"
    );
    kill9(&mut child);
}

#[test]
fn bad_configuration_fails_with_one_line_and_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "cache_sise = 5\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--listen".into(), "nowhere".into()], "listen"),
        (vec!["--registry".into(), "docker.io".into()], "HOST=URL"),
        (vec!["--upstream".into(), "ftp://x".into()], "scheme"),
        (vec!["--cache-size".into(), "ten".into()], "cache_size"),
        (
            vec!["--config".into(), bad_toml.display().to_string()],
            "cache_sise",
        ),
        (
            vec!["--auth-file".into(), "/nonexistent/auth.json".into()],
            "auth_file",
        ),
        (
            vec![
                "--p2p-listen".into(),
                "127.0.0.1:0".into(),
                "--site".into(),
                "zone a".into(),
            ],
            "site",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(shoal_bin())
            .arg("run")
            .arg("--data-dir")
            .arg(dir.path())
            .args(&args)
            .output()
            .expect("shoal runs");
        assert!(!out.status.success(), "{args:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err}"
        );
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
