//! `shoal-cluster`: a cluster of N hosts as Linux network namespaces, each behind a shaped link,
//! pulling one image at once through their local `shoal` and, as a baseline, straight from the
//! upstream registry. See `tools/cluster/README.md`.
//!
//! ```text
//! shoal-cluster run --hosts 8 --rate 200mbit --image-size 256MiB --layers 4 --out DIR
//! shoal-cluster cleanup            # removes leftovers of earlier runs (namespaces shc-*)
//! ```
//!
//! Topology (everything outside the root namespace; the root namespace is never touched):
//!
//! ```text
//!   ns <run>-h1 .. <run>-hN     eth0 10.77.1.I/16   -- veth --  hI    \
//!                                                                    br0 (or site bridge brK,
//!   ns <run>-reg                 eth0 10.77.0.1/16   -- veth --  reg  /  joined to br0 by a
//!                                                    (ns <run>-sw)       shaped WAN veth pair)
//! ```
//!
//! Every link is shaped with `tbf` on both ends: the egress of the host-side end is the host's
//! upload, the egress of the switch-side end its download. Upstream egress is read from the
//! registry's own log (`http.response.written` of each GET .../blobs/...), cross-checked with the
//! byte counter of the registry link's qdisc; never from shoal's own metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Namespace names and temp dirs of every run start with this.
const PREFIX: &str = "shc-";
const REG_IP: &str = "10.77.0.1";
const REG_PORT: u16 = 5000;
const SHOAL_PORT: u16 = 5000;
const P2P_PORT: u16 = 7000;
const REPO: &str = "cluster/img";
const TAG: &str = "v1";
/// `--dns-peers`: the name every node bootstraps from.
const PEERS_NAME: &str = "shoal-peers";
/// `--dns-peers`: an address in the hosts' subnet where nothing answers (a pod of the service
/// that is gone), listed first under the name.
const DEAD_PEER_IP: &str = "10.77.3.254";
/// Per-namespace files `ip netns exec` bind-mounts over /etc (here: `hosts`).
const NETNS_ETC: &str = "/etc/netns";

/// Set by SIGINT/SIGTERM/SIGHUP: every wait and command checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The run being set up (for the signal thread's last-resort clean-up).
static CURRENT_RUN: Mutex<Option<String>> = Mutex::new(None);

#[derive(Parser)]
#[command(
    about = "Network-namespace cluster harness: N hosts pull one image through shoal vs straight from the registry"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the cluster, run the scenario (baseline and shoal), write the report, tear down.
    Run(Box<RunArgs>),
    /// Redraw the completion chart (SVG) of a report.json.
    Chart {
        /// The report.
        report: PathBuf,
        /// Where to write the SVG (default: completion.svg beside the report).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Remove every namespace, process and temp dir left by earlier runs (name prefix shc-).
    Cleanup {
        /// Only names starting with this (must start with shc-), e.g. one run's shc-PID.
        #[arg(long, default_value = PREFIX)]
        prefix: String,
    },
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// Number of hosts (1-200; 16 fit a 2-core machine).
    #[arg(long, default_value_t = 8)]
    hosts: usize,
    /// Each host's link rate, both directions (tc syntax: 200mbit, 1gbit, 500kbit).
    #[arg(long, default_value = "200mbit")]
    rate: String,
    /// The upstream registry's link rate, both directions.
    #[arg(long, default_value = "1gbit")]
    registry_rate: String,
    /// Split the hosts over K site bridges joined to the core (registry) bridge by WAN links.
    #[arg(long, default_value_t = 0)]
    sites: usize,
    /// Rate of each site's WAN link, both directions.
    #[arg(long, default_value = "50mbit")]
    wan_rate: String,
    /// Total blob bytes of the generated image (split evenly over --layers).
    #[arg(long, default_value = "256MiB")]
    image_size: String,
    /// Layers of the generated image.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Seed of the generated image (default: derived from the time, so each run is cold).
    #[arg(long)]
    seed: Option<u64>,
    /// Output directory: report.json, completion.svg, logs/.
    #[arg(long, default_value = "cluster-out")]
    out: PathBuf,
    /// shoal binary (copied to the run's temp dir first).
    #[arg(long, default_value = "target/debug/shoal")]
    shoal: PathBuf,
    /// shoal-imagegen binary (copied to the run's temp dir first).
    #[arg(long, default_value = "target/debug/shoal-imagegen")]
    imagegen: PathBuf,
    /// Skip the baseline (hosts pulling straight from the registry).
    #[arg(long)]
    no_baseline: bool,
    /// Skip the shoal phase.
    #[arg(long)]
    no_shoal: bool,
    /// Seconds a phase may take before its unfinished pulls count as failed.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Seconds to wait after every node answers /v2/ before the pulls start (DHT forming).
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Extra argument for every `shoal run` (repeatable), e.g. --shoal-arg=--chunk-size=1MiB.
    #[arg(long = "shoal-arg", allow_hyphen_values = true)]
    shoal_args: Vec<String>,
    /// RUST_LOG / SHOAL_LOG for the nodes.
    #[arg(long, default_value = "info")]
    log: String,
    /// One-way delay (ms) added on the registry path by a user-space TCP relay in the registry
    /// namespace (tools/cluster/delay_relay.py); 0: no relay.
    #[arg(long, default_value_t = 0)]
    upstream_delay_ms: u64,
    /// The delay relay script (copied to the run's temp dir first).
    #[arg(long, default_value = "tools/cluster/delay_relay.py")]
    relay_script: PathBuf,
    /// Keep the run's temp dir (pulled images, node data) for inspection.
    #[arg(long)]
    keep: bool,
    /// With --sites: do not tell the nodes their site (`--site`), so that they treat every
    /// peer alike (the comparison without locality).
    #[arg(long)]
    no_site_labels: bool,
    /// The nodes find each other by mDNS on their LAN (`shoal run --mdns`) instead of
    /// bootstrapping from host 1's address (`--peer`): the edge-site set-up.
    #[arg(long, conflicts_with = "dns_peers")]
    mdns: bool,
    /// Every node bootstraps from one DNS name (`--peer shoal-peers:7000`) that resolves, in
    /// each host's namespace (`/etc/netns/NS/hosts`), to an address where nothing answers and
    /// to every host's address: a Kubernetes headless service.
    #[arg(long)]
    dns_peers: bool,
    /// The longest a packet may wait in a shaped link's queue (`tbf latency`, ms): the queue
    /// holds this much time at the link's rate. 100 ms is a deep ("bufferbloated") FIFO.
    #[arg(long, default_value_t = 100)]
    queue_ms: u64,
}

fn main() {
    let cli = Cli::parse();
    install_signal_thread();
    let rc = match cli.cmd {
        Cmd::Cleanup { prefix } if !prefix.starts_with(PREFIX) => {
            eprintln!("cleanup: --prefix must start with {PREFIX}");
            2
        }
        Cmd::Cleanup { prefix } => match cleanup_prefix(&prefix, true) {
            Ok(n) => {
                eprintln!("cleanup: removed {n} namespace(s) and temp dirs with prefix {prefix}");
                0
            }
            Err(e) => {
                eprintln!("cleanup: {e:#}");
                1
            }
        },
        Cmd::Chart { report, out } => {
            let out = out.unwrap_or_else(|| report.with_file_name("completion.svg"));
            let r = fs::read_to_string(&report)
                .map_err(anyhow::Error::from)
                .and_then(|s| serde_json::from_str::<Value>(&s).map_err(Into::into))
                .and_then(|v| fs::write(&out, chart_from_report(&v)).map_err(Into::into));
            match r {
                Ok(()) => {
                    eprintln!("chart: {}", out.display());
                    0
                }
                Err(e) => {
                    eprintln!("chart: {e:#}");
                    1
                }
            }
        }
        Cmd::Run(args) => match run(*args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("shoal-cluster: {e:#}");
                if INTERRUPTED.load(Ordering::SeqCst) {
                    130
                } else {
                    1
                }
            }
        },
    };
    std::process::exit(rc);
}

/// A thread waiting for SIGINT/SIGTERM/SIGHUP: it flags the run as interrupted and kills every
/// process in the run's namespaces so the main thread's waits return at once and it cleans up.
/// If the main thread has not finished 60 s later (or on a second signal), it cleans up itself
/// and exits.
fn install_signal_thread() {
    std::thread::spawn(|| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => return,
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {}, _ = hup.recv() => {} }
            eprintln!("shoal-cluster: interrupted, cleaning up");
            INTERRUPTED.store(true, Ordering::SeqCst);
            let run = CURRENT_RUN.lock().map(|g| g.clone()).unwrap_or(None);
            if let Some(run) = &run {
                kill_ns_processes(run);
            }
            tokio::select! {
                _ = int.recv() => {}, _ = term.recv() => {}, _ = hup.recv() => {},
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            if let Some(run) = &run {
                let _ = cleanup_prefix(run, false);
                let _ = fs::remove_dir_all(Path::new("/tmp").join(run));
            }
            std::process::exit(130);
        });
    });
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep that returns early (with an error) when interrupted.
fn nap(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    check_interrupted()
}

/// Run a command to completion; error (with its stderr) unless it exits 0. Returns stdout.
fn cmd(args: &[&str]) -> Result<String> {
    check_interrupted()?;
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command, ignore failure.
fn cmd_quiet(args: &[&str]) -> Option<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ns_cmd(ns: &str, args: &[&str]) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    cmd(&v)
}

/// `ip netns exec NS ARGS...` as a spawned child with stdout+stderr to LOG.
fn ns_spawn(ns: &str, args: &[&str], env: &[(&str, &str)], log: &Path) -> Result<Child> {
    check_interrupted()?;
    let f = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let f2 = f.try_clone()?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn()
        .with_context(|| format!("spawn {} in {ns}", args.join(" ")))
}

/// HTTP GET from inside a namespace (curl); returns (status, body).
fn ns_get(ns: &str, url: &str, max_time: u64) -> (u16, String) {
    let mt = max_time.to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "--max-time",
            &mt,
            "-w",
            "\n%{http_code}",
            url,
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) => {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            match s.rsplit_once('\n') {
                Some((body, code)) => (code.trim().parse().unwrap_or(0), body.to_string()),
                None => (0, String::new()),
            }
        }
        Err(_) => (0, String::new()),
    }
}

// ------------------------------------------------------------------------------------------------
// Clean-up

fn list_netns() -> Vec<String> {
    cmd_quiet(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn ns_pids(ns: &str) -> Vec<u32> {
    cmd_quiet(&["ip", "netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn kill(pid: u32, sig: &str) {
    let _ = cmd_quiet(&["kill", &format!("-{sig}"), &pid.to_string()]);
}

/// TERM every process in the namespaces whose name starts with `prefix`, KILL them after 5 s.
fn kill_ns_processes(prefix: &str) {
    let nss: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    let mut pids = Vec::new();
    for ns in &nss {
        pids.extend(ns_pids(ns));
    }
    for &p in &pids {
        kill(p, "TERM");
    }
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && pids.iter().any(|&p| pid_alive(p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for ns in &nss {
        for p in ns_pids(ns) {
            kill(p, "KILL");
        }
    }
}

/// Remove every namespace named `prefix*` (after killing its processes): hosts and the registry
/// first, the switch last (deleting a namespace destroys its veth ends, and so their peers).
/// With `tmp`, also the temp dirs /tmp/`prefix`*. Returns the number of namespaces removed.
fn cleanup_prefix(prefix: &str, tmp: bool) -> Result<usize> {
    kill_ns_processes(prefix);
    let mut nss: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    nss.sort_by_key(|n| n.ends_with("-sw"));
    let mut n = 0;
    let mut errors = Vec::new();
    for ns in &nss {
        match cmd_quiet(&["ip", "netns", "del", ns]) {
            Some(_) => n += 1,
            None => errors.push(ns.clone()),
        }
    }
    // `--dns-peers` hosts files (after the namespaces: nothing runs in them any more)
    if let Ok(rd) = fs::read_dir(NETNS_ETC) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if tmp {
        if let Ok(rd) = fs::read_dir("/tmp") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) && e.path().is_dir() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    if !errors.is_empty() {
        bail!("could not delete namespace(s) {}", errors.join(" "));
    }
    Ok(n)
}

/// Tears the run down when dropped (normal end, error, panic).
struct Teardown {
    run: String,
    tmp: PathBuf,
    keep: bool,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        eprintln!("[cluster] tearing down {}", self.run);
        if let Err(e) = cleanup_prefix(&self.run, false) {
            eprintln!("[cluster] clean-up: {e:#}");
        }
        if self.keep {
            eprintln!("[cluster] keeping {}", self.tmp.display());
        } else {
            let _ = fs::remove_dir_all(&self.tmp);
        }
        if let Ok(mut g) = CURRENT_RUN.lock() {
            *g = None;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Parsing

/// "200mbit" -> bits per second (tc units: bit, kbit, mbit, gbit; also bps/kbps/mbps as bytes).
fn parse_rate(s: &str) -> Result<u64> {
    let l = s.trim().to_ascii_lowercase();
    let split = l
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(l.len());
    let (num, unit) = l.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("bad rate {s:?}"))?;
    let mult = match unit {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => bail!("bad rate unit in {s:?} (use bit, kbit, mbit, gbit)"),
    };
    let r = (n * mult) as u64;
    if r < 8000 {
        bail!("rate {s:?} too low");
    }
    Ok(r)
}

/// "256MiB" -> bytes (K/M/G and KiB/MiB/GiB are powers of 1024).
fn parse_size(s: &str) -> Result<u64> {
    let l = s.trim().to_ascii_lowercase();
    let split = l
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(l.len());
    let (num, unit) = l.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    let mult = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 1u64,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => bail!("bad size unit in {s:?}"),
    };
    Ok((n * mult as f64) as u64)
}

fn human_rate(bits: u64) -> String {
    if bits >= 1_000_000_000 && bits.is_multiple_of(1_000_000) {
        format!("{} Gbit/s", bits as f64 / 1e9)
    } else {
        format!("{} Mbit/s", bits as f64 / 1e6)
    }
}

// ------------------------------------------------------------------------------------------------
// Network

struct Net {
    /// The switch namespace: the host-side ends of every host link (`h1`..`hN`) live there.
    sw: String,
    /// The link rate of every host, bits per second.
    rate: u64,
    reg: String,
    hosts: Vec<String>,
}

impl Net {
    fn host_ip(i: usize) -> String {
        format!("10.77.{}.{}", 1 + i / 250, 1 + i % 250)
    }
}

/// tbf on the egress of DEV in NS at RATE bits/s, queueing at most QUEUE_MS.
fn shape(ns: &str, dev: &str, rate: u64, queue_ms: u64) -> Result<()> {
    // burst: 10 ms at the rate, at least 64 KiB (a GSO packet on a veth)
    let burst = (rate / 8 / 100).max(64 * 1024);
    cmd(&[
        "tc",
        "-n",
        ns,
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{rate}bit"),
        "burst",
        &burst.to_string(),
        "latency",
        &format!("{queue_ms}ms"),
    ])?;
    Ok(())
}

/// Bytes sent through the root qdisc of DEV in NS (0 if unreadable).
fn qdisc_bytes(ns: &str, dev: &str) -> u64 {
    let Some(out) = cmd_quiet(&["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev]) else {
        return 0;
    };
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    v.as_array()
        .and_then(|a| {
            a.iter()
                .find(|q| q["root"].as_bool() == Some(true) || q["parent"].is_null())
        })
        .and_then(|q| q["bytes"].as_u64())
        .unwrap_or(0)
}

/// A veth pair with one end DEV_A in NS_A and the other DEV_B in NS_B (created directly there).
fn veth(ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str) -> Result<()> {
    cmd(&[
        "ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns",
        ns_b,
    ])?;
    Ok(())
}

fn build_net(a: &RunArgs, run: &str, rate: u64, reg_rate: u64, wan_rate: u64) -> Result<Net> {
    let sw = format!("{run}-sw");
    let reg = format!("{run}-reg");
    let hosts: Vec<String> = (1..=a.hosts).map(|i| format!("{run}-h{i}")).collect();
    for ns in std::iter::once(&sw)
        .chain(std::iter::once(&reg))
        .chain(hosts.iter())
    {
        cmd(&["ip", "netns", "add", ns])?;
        cmd(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    // the switch: a core bridge (registry), and site bridges joined to it by WAN links
    cmd(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
    cmd(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
    let site_bridge = |i: usize| -> String {
        if a.sites == 0 {
            "br0".to_string()
        } else {
            // contiguous blocks: hosts 1..n/K in site 1, ...
            format!("br{}", 1 + i * a.sites / a.hosts)
        }
    };
    for k in 1..=a.sites {
        let br = format!("br{k}");
        cmd(&["ip", "-n", &sw, "link", "add", &br, "type", "bridge"])?;
        cmd(&["ip", "-n", &sw, "link", "set", &br, "up"])?;
        let (wa, wb) = (format!("wan{k}a"), format!("wan{k}b"));
        veth(&sw, &wa, &sw, &wb)?;
        cmd(&["ip", "-n", &sw, "link", "set", &wa, "master", &br, "up"])?;
        cmd(&["ip", "-n", &sw, "link", "set", &wb, "master", "br0", "up"])?;
        shape(&sw, &wa, wan_rate, a.queue_ms)?; // core -> site
        shape(&sw, &wb, wan_rate, a.queue_ms)?; // site -> core
    }
    // the registry
    veth(&sw, "reg", &reg, "eth0")?;
    cmd(&["ip", "-n", &sw, "link", "set", "reg", "master", "br0", "up"])?;
    cmd(&[
        "ip",
        "-n",
        &reg,
        "addr",
        "add",
        &format!("{REG_IP}/16"),
        "dev",
        "eth0",
    ])?;
    cmd(&["ip", "-n", &reg, "link", "set", "eth0", "up"])?;
    shape(&reg, "eth0", reg_rate, a.queue_ms)?;
    shape(&sw, "reg", reg_rate, a.queue_ms)?;
    // the hosts
    for (i, h) in hosts.iter().enumerate() {
        let dev = format!("h{}", i + 1);
        veth(&sw, &dev, h, "eth0")?;
        cmd(&[
            "ip",
            "-n",
            &sw,
            "link",
            "set",
            &dev,
            "master",
            &site_bridge(i),
            "up",
        ])?;
        cmd(&[
            "ip",
            "-n",
            h,
            "addr",
            "add",
            &format!("{}/16", Net::host_ip(i)),
            "dev",
            "eth0",
        ])?;
        cmd(&["ip", "-n", h, "link", "set", "eth0", "up"])?;
        shape(h, "eth0", rate, a.queue_ms)?; // upload
        shape(&sw, &dev, rate, a.queue_ms)?; // download
    }
    Ok(Net {
        sw,
        rate,
        reg,
        hosts,
    })
}

// ------------------------------------------------------------------------------------------------
// Image, registry

struct Image {
    manifest_digest: String,
    /// config + layers: (digest, size)
    blobs: Vec<(String, u64)>,
    blob_bytes: u64,
}

fn gen_image(imagegen: &Path, dir: &Path, a: &RunArgs, seed: u64) -> Result<Image> {
    let total = parse_size(&a.image_size)?;
    let layers = a.layers.max(1);
    let layer_size = (total / layers as u64).max(1);
    let out = cmd(&[
        imagegen.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--tag",
        TAG,
        "--seed",
        &seed.to_string(),
        "--layers",
        &layers.to_string(),
        "--layer-size",
        &layer_size.to_string(),
    ])?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("imagegen printed no JSON"))?;
    let v: Value = serde_json::from_str(line)?;
    let m = &v["manifests"][0];
    let manifest_digest = m["digest"]
        .as_str()
        .or(v["manifest_digest"].as_str())
        .unwrap_or_default()
        .to_string();
    let mut wanted: Vec<String> = vec![m["config"].as_str().unwrap_or_default().to_string()];
    for l in m["layers"].as_array().into_iter().flatten() {
        wanted.push(l.as_str().unwrap_or_default().to_string());
    }
    let mut blobs = Vec::new();
    for d in wanted {
        let size = v["blobs"]
            .as_array()
            .and_then(|b| b.iter().find(|x| x["digest"].as_str() == Some(d.as_str())))
            .and_then(|x| x["size"].as_u64())
            .ok_or_else(|| anyhow!("imagegen JSON lacks the size of {d}"))?;
        blobs.push((d, size));
    }
    let blob_bytes = blobs.iter().map(|b| b.1).sum();
    fs::write(dir.with_extension("json"), line)?;
    Ok(Image {
        manifest_digest,
        blobs,
        blob_bytes,
    })
}

/// docker-registry in the registry namespace on 0.0.0.0:PORT (127.0.0.1:PORT when a relay
/// fronts it).
fn start_registry(net: &Net, tmp: &Path, listen: &str, port: u16) -> Result<(Child, PathBuf)> {
    let dir = tmp.join("registry");
    fs::create_dir_all(dir.join("data"))?;
    let cfg = format!(
        "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: inmemory\nhttp:\n  addr: {listen}:{port}\n  secret: shoal-cluster-{}\n",
        dir.join("data").display(),
        std::process::id()
    );
    fs::write(dir.join("config.yml"), cfg)?;
    let log = dir.join("registry.log");
    let child = ns_spawn(
        &net.reg,
        &[
            "docker-registry",
            "serve",
            dir.join("config.yml").to_str().unwrap(),
        ],
        &[],
        &log,
    )?;
    let url = format!("http://127.0.0.1:{port}/v2/");
    let end = Instant::now() + Duration::from_secs(30);
    while ns_get(&net.reg, &url, 2).0 != 200 {
        if Instant::now() > end {
            bail!("registry did not come up: {}", tail(&log, 5));
        }
        nap(Duration::from_millis(200))?;
    }
    Ok((child, log))
}

fn tail(p: &Path, n: usize) -> String {
    let s = fs::read_to_string(p).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join(" | ")
}

/// Registry-side egress from the log lines written since OFFSET: body bytes of GET .../blobs/
/// (total, per blob, per client address) and of manifests.
fn registry_egress(
    log: &Path,
    offset: u64,
    host_of_ip: &BTreeMap<String, String>,
) -> Result<Value> {
    let mut f = fs::File::open(log)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    let field = |line: &str, key: &str| -> Option<String> {
        let i = line.find(key)? + key.len();
        let rest = &line[i..];
        if let Some(r) = rest.strip_prefix('"') {
            r.find('"').map(|j| r[..j].to_string())
        } else {
            Some(rest.split_whitespace().next().unwrap_or("").to_string())
        }
    };
    let (mut blob, mut manifest, mut requests) = (0u64, 0u64, 0u64);
    let mut by_blob: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_client: BTreeMap<String, u64> = BTreeMap::new();
    for line in s.lines() {
        if !line.contains("response completed") {
            continue;
        }
        let method = field(line, "http.request.method=").unwrap_or_default();
        let uri = field(line, "http.request.uri=").unwrap_or_default();
        let written: u64 = field(line, "http.response.written=")
            .and_then(|w| w.parse().ok())
            .unwrap_or(0);
        let addr = field(line, "http.request.remoteaddr=").unwrap_or_default();
        let ip = addr
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or(addr);
        requests += 1;
        if method != "GET" {
            continue;
        }
        if let Some(i) = uri.find("/blobs/") {
            blob += written;
            let d = uri[i + 7..].split('?').next().unwrap_or("").to_string();
            *by_blob.entry(d).or_default() += written;
            let who = host_of_ip.get(&ip).cloned().unwrap_or(ip);
            *by_client.entry(who).or_default() += written;
        } else if uri.contains("/manifests/") {
            manifest += written;
        }
    }
    Ok(
        json!({"blob_bytes": blob, "manifest_bytes": manifest, "requests": requests,
              "by_blob": by_blob, "blob_bytes_by_host": by_client}),
    )
}

// ------------------------------------------------------------------------------------------------
// Phases

struct Pull {
    child: Child,
    out: PathBuf,
    log: PathBuf,
    done: Option<(f64, bool)>,
}

/// Start a `skopeo copy` on every host at once (SRC(i) gives the source reference), wait for all
/// of them (or the timeout); returns per host (seconds, success, error, link use) and the
/// phase's link series (see [`link_report`]).
fn pull_all(
    net: &Net,
    dir: &Path,
    src: &dyn Fn(usize) -> String,
    timeout: u64,
) -> Result<(Vec<Value>, Value)> {
    fs::create_dir_all(dir)?;
    // A process parked in the switch namespace: its /proc/PID/net/dev counts every host link.
    let mut probe = ns_spawn(&net.sw, &["sleep", "86400"], &[], &dir.join("probe.log"))?;
    let stop = AtomicBool::new(false);
    let (pulled, samples) = std::thread::scope(|sc| {
        let sampler = sc.spawn(|| sample_links(probe.id(), net.hosts.len(), &stop));
        let pulled = pull_each(net, dir, src, timeout);
        stop.store(true, Ordering::Relaxed);
        (pulled, sampler.join().unwrap_or_default())
    });
    let _ = probe.kill();
    let _ = probe.wait();
    let mut hosts = pulled?;
    let links = link_report(&samples, &mut hosts, net.rate);
    Ok((hosts, links))
}

/// Starts the pulls of [`pull_all`] and waits for them.
fn pull_each(
    net: &Net,
    dir: &Path,
    src: &dyn Fn(usize) -> String,
    timeout: u64,
) -> Result<Vec<Value>> {
    let mut pulls = Vec::new();
    let t0 = Instant::now();
    for (i, h) in net.hosts.iter().enumerate() {
        let out = dir.join(format!("h{}", i + 1));
        let log = dir.join(format!("h{}.log", i + 1));
        let s = src(i);
        // oci: (not dir:) so that layers are fetched in parallel, as containerd / docker do:
        // skopeo copies into a dir: destination one blob at a time
        let dst = format!("oci:{}:{TAG}", out.display());
        let child = ns_spawn(
            h,
            &[
                "skopeo",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                &s,
                &dst,
            ],
            &[],
            &log,
        )?;
        pulls.push(Pull {
            child,
            out,
            log,
            done: None,
        });
    }
    let deadline = t0 + Duration::from_secs(timeout);
    loop {
        let mut pending = 0;
        for p in pulls.iter_mut().filter(|p| p.done.is_none()) {
            match p.child.try_wait()? {
                Some(st) => p.done = Some((t0.elapsed().as_secs_f64(), st.success())),
                None => pending += 1,
            }
        }
        if pending == 0 {
            break;
        }
        if Instant::now() > deadline || INTERRUPTED.load(Ordering::SeqCst) {
            for p in pulls.iter_mut().filter(|p| p.done.is_none()) {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
            check_interrupted()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pulls
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (secs, ok) = p.done.unwrap_or((f64::NAN, false));
            let err = if ok { String::new() } else if p.done.is_none() { format!("timed out after {timeout} s") } else { tail(&p.log, 3) };
            json!({"host": format!("h{}", i + 1), "seconds": if secs.is_nan() { Value::Null } else { json!(secs) },
                   "ok": ok, "error": err, "dir": p.out.display().to_string()})
        })
        .collect())
}

/// One reading of the host links: seconds since the pulls started, and per host the bytes its
/// switch-side end sent (the host's download) and received (its upload).
type LinkSample = (f64, Vec<(u64, u64)>);

/// How often [`sample_links`] reads the link counters.
const LINK_SAMPLE: Duration = Duration::from_millis(100);

/// Reads `/proc/PID/net/dev` of a process in the switch namespace every [`LINK_SAMPLE`] until
/// `stop`: the counters of `h1`..`hN`.
fn sample_links(pid: u32, hosts: usize, stop: &AtomicBool) -> Vec<LinkSample> {
    let t0 = Instant::now();
    let mut out = Vec::new();
    loop {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/dev")) {
            // (before `ip netns exec` has entered the namespace, the probe sees the root
            // namespace's devices: such a reading has none of the host links and is skipped)
            let mut v = vec![(0u64, 0u64); hosts];
            let mut seen = 0;
            for line in text.lines() {
                let Some((name, rest)) = line.split_once(':') else {
                    continue;
                };
                let Some(i) = name
                    .trim()
                    .strip_prefix('h')
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    continue;
                };
                let f: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if (1..=hosts).contains(&i) && f.len() >= 9 {
                    // receive bytes first, transmit bytes ninth
                    v[i - 1] = (f[8], f[0]);
                    seen += 1;
                }
            }
            if seen == hosts {
                out.push((t0.elapsed().as_secs_f64(), v));
            }
        }
        if stop.load(Ordering::Relaxed) {
            return out;
        }
        std::thread::sleep(LINK_SAMPLE);
    }
}

/// How busy the host links were: per host (in HOSTS) `link` = bytes down and up until it
/// finished, and its download's use of the link rate over that time; for the phase, the mean
/// download use over the hosts, the upload use of all hosts until the last one finished, and
/// the series in Mbit/s per 0.5 s.
fn link_report(samples: &[LinkSample], hosts: &mut [Value], rate_bit: u64) -> Value {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return Value::Null;
    };
    let rate = rate_bit as f64 / 8.0;
    // the counters at time t: the last sample at or before it
    let at = |t: f64| -> &Vec<(u64, u64)> {
        &samples[samples.partition_point(|s| s.0 <= t).max(1) - 1].1
    };
    let mut down_use = Vec::new();
    let mut end = 0f64;
    for (i, h) in hosts.iter_mut().enumerate() {
        let Some(secs) = h["seconds"].as_f64() else {
            continue;
        };
        end = end.max(secs);
        let (d, u) = at(secs)[i];
        let (d0, u0) = first.1[i];
        let down = d.saturating_sub(d0);
        let used = down as f64 / (rate * secs.max(1e-3));
        down_use.push(used);
        h["link"] =
            json!({"down_bytes": down, "up_bytes": u.saturating_sub(u0), "down_use": r3(used)});
    }
    let up: u64 = at(end)
        .iter()
        .zip(&first.1)
        .map(|(b, a)| b.1.saturating_sub(a.1))
        .sum();
    let step = 0.5;
    let mut series_down = vec![Vec::new(); hosts.len()];
    let mut series_up = vec![Vec::new(); hosts.len()];
    let mut t = 0.0;
    while t < last.0 {
        let (a, b) = (at(t), at(t + step));
        for i in 0..hosts.len() {
            let mbit = |x: u64, y: u64| r3(y.saturating_sub(x) as f64 * 8.0 / step / 1e6);
            series_down[i].push(mbit(a[i].0, b[i].0));
            series_up[i].push(mbit(a[i].1, b[i].1));
        }
        t += step;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    json!({
        "down_use_mean": r3(mean(&down_use)),
        "up_use_until_last": r3(up as f64 / (rate * end.max(1e-3) * hosts.len().max(1) as f64)),
        "series_step_s": step,
        "down_mbit": series_down,
        "up_mbit": series_up,
    })
}

/// Verifies every host's pulled copy (recording `verified` and `verify_error` in its entry),
/// then removes the copy.
fn verify_copies(hosts: &mut [Value], img: &Image) {
    for h in hosts.iter_mut() {
        let d = PathBuf::from(h["dir"].as_str().unwrap_or(""));
        let v = if h["ok"] == true {
            verify_copy(&d, img)
        } else {
            Some("pull failed".into())
        };
        h["verified"] = json!(v.is_none());
        if let Some(e) = v {
            h["verify_error"] = json!(e);
        }
        let _ = fs::remove_dir_all(&d);
    }
}

/// Check a skopeo oci: copy: index.json names the manifest digest, the layout holds exactly the
/// manifest, config and layers, and every blob hashes to its name. Returns an error, or None.
fn verify_copy(dir: &Path, img: &Image) -> Option<String> {
    let index: Value =
        match fs::read_to_string(dir.join("index.json")).map(|s| serde_json::from_str(&s)) {
            Ok(Ok(v)) => v,
            _ => return Some("no readable index.json".into()),
        };
    let got = index["manifests"][0]["digest"].as_str().unwrap_or("");
    if got != img.manifest_digest {
        return Some(format!(
            "index.json names {got}, want {}",
            img.manifest_digest
        ));
    }
    let blobdir = dir.join("blobs/sha256");
    let mut want: Vec<String> = img
        .blobs
        .iter()
        .map(|b| b.0.trim_start_matches("sha256:").to_string())
        .collect();
    want.push(
        img.manifest_digest
            .trim_start_matches("sha256:")
            .to_string(),
    );
    want.sort();
    let mut have: Vec<String> = fs::read_dir(&blobdir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    have.sort();
    if have != want {
        return Some(format!("blobs {have:?}, want {want:?}"));
    }
    let files: Vec<String> = have
        .iter()
        .map(|h| blobdir.join(h).display().to_string())
        .collect();
    let mut args: Vec<&str> = vec!["sha256sum"];
    args.extend(files.iter().map(String::as_str));
    let out = match cmd(&args) {
        Ok(o) => o,
        Err(e) => return Some(format!("{e:#}")),
    };
    for (line, name) in out.lines().zip(have.iter()) {
        let got = line.split_whitespace().next().unwrap_or("");
        if got != name {
            return Some(format!("blob {name} hashes to {got}"));
        }
    }
    None
}

/// (busy, total) jiffies of the whole machine, from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Busy fraction of all CPUs between two cpu_jiffies() samples.
fn cpu_busy(a: (u64, u64), b: (u64, u64)) -> Value {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        return Value::Null;
    }
    r3(b.0.saturating_sub(a.0) as f64 / total as f64)
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat (100 ticks a second).
fn proc_cpu_s(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / 100.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn r3(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

/// Summarise a phase: completion stats, copies, verification.
fn summarise(
    name: &str,
    hosts: Vec<Value>,
    egress: Value,
    link_bytes: u64,
    img: &Image,
    ideal: f64,
) -> Value {
    let mut times: Vec<f64> = hosts
        .iter()
        .filter(|h| h["ok"] == true)
        .filter_map(|h| h["seconds"].as_f64())
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99, max) = (
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        percentile(&times, 100.0),
    );
    let blob = egress["blob_bytes"].as_u64().unwrap_or(0);
    json!({
        "phase": name,
        "hosts_total": hosts.len(),
        "hosts_completed": times.len(),
        "all_completed": times.len() == hosts.len(),
        "digests_ok": hosts.iter().all(|h| h["verified"] == true),
        "p50_s": r3(p50), "p99_s": r3(p99), "max_s": r3(max),
        "ratio_to_ideal": {"p50": r3(p50 / ideal), "p99": r3(p99 / ideal), "max": r3(max / ideal)},
        "upstream": {
            "blob_bytes": blob,
            "copies": r3(blob as f64 / img.blob_bytes as f64),
            "registry_log": egress,
            "registry_link_bytes_tc": link_bytes,
            "registry_link_copies_tc": r3(link_bytes as f64 / img.blob_bytes as f64),
        },
        "hosts": hosts,
    })
}

fn run_baseline(
    net: &Net,
    tmp: &Path,
    img: &Image,
    reg_log: &Path,
    a: &RunArgs,
    ideal: f64,
    host_of_ip: &BTreeMap<String, String>,
) -> Result<Value> {
    eprintln!(
        "[cluster] baseline: {} hosts pull straight from the registry",
        net.hosts.len()
    );
    let off = fs::metadata(reg_log)?.len();
    let link0 = qdisc_bytes(&net.reg, "eth0");
    let src = |_i: usize| format!("docker://{REG_IP}:{REG_PORT}/{REPO}:{TAG}");
    let dir = tmp.join("pull-baseline");
    let cpu0 = cpu_jiffies();
    let (mut hosts, links) = pull_all(net, &dir, &src, a.timeout)?;
    let cpu = cpu_busy(cpu0, cpu_jiffies());
    nap(Duration::from_millis(500))?; // the registry logs after the last byte
    let link = qdisc_bytes(&net.reg, "eth0").saturating_sub(link0);
    let egress = registry_egress(reg_log, off, host_of_ip)?;
    verify_copies(&mut hosts, img);
    let mut s = summarise("baseline", hosts, egress, link, img, ideal);
    s["machine_cpu_busy"] = cpu;
    s["links"] = links;
    Ok(s)
}

struct Node {
    child: Child,
    log: PathBuf,
}

/// `--dns-peers`: each host namespace's /etc/hosts (`/etc/netns/NS/hosts`, which `ip netns
/// exec` mounts) names [`DEAD_PEER_IP`] and every host [`PEERS_NAME`]. Removed with the
/// namespaces (`cleanup_prefix`).
fn write_peer_names(hosts: &[String]) -> Result<()> {
    let mut text = format!("127.0.0.1 localhost\n{DEAD_PEER_IP} {PEERS_NAME}\n");
    for i in 0..hosts.len() {
        text.push_str(&format!("{} {PEERS_NAME}\n", Net::host_ip(i)));
    }
    for h in hosts {
        let dir = Path::new(NETNS_ETC).join(h);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        fs::write(dir.join("hosts"), &text)
            .with_context(|| format!("write {}/hosts", dir.display()))?;
    }
    Ok(())
}

fn start_nodes(net: &Net, tmp: &Path, bin: &Path, key: &Path, a: &RunArgs) -> Result<Vec<Node>> {
    let mut nodes: Vec<Node> = Vec::new();
    let upstream = format!("http://{REG_IP}:{REG_PORT}");
    let registry = format!("docker.io={upstream}");
    let listen = format!("127.0.0.1:{SHOAL_PORT}");
    let bootstrap = format!("{}:{P2P_PORT}", Net::host_ip(0));
    if a.dns_peers {
        write_peer_names(&net.hosts)?;
    }
    for (i, h) in net.hosts.iter().enumerate() {
        let data = tmp.join(format!("node-h{}", i + 1));
        fs::create_dir_all(&data)?;
        let p2p = format!("{}:{P2P_PORT}", Net::host_ip(i));
        let mut args: Vec<String> = vec![
            bin.display().to_string(),
            "run".into(),
            "--listen".into(),
            listen.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--upstream".into(),
            upstream.clone(),
            "--registry".into(),
            registry.clone(),
            "--p2p-listen".into(),
            p2p,
            "--cluster-key-file".into(),
            key.display().to_string(),
        ];
        if a.mdns {
            args.push("--mdns".into());
        } else if a.dns_peers {
            args.push("--peer".into());
            args.push(format!("{PEERS_NAME}:{P2P_PORT}"));
        } else if i > 0 {
            args.push("--peer".into());
            args.push(bootstrap.clone());
        }
        if a.sites > 0 && !a.no_site_labels {
            // the same blocks as the site bridges (`build_net`)
            args.push("--site".into());
            args.push(format!("site{}", 1 + i * a.sites / a.hosts));
        }
        args.extend(a.shoal_args.iter().cloned());
        let log = tmp.join(format!("shoal-h{}.log", i + 1));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = ns_spawn(
            h,
            &argv,
            &[("RUST_LOG", &a.log), ("SHOAL_LOG", &a.log)],
            &log,
        )?;
        nodes.push(Node { child, log });
        // node 1 first: the others bootstrap from it
        if i == 0 {
            wait_node(net, 0, &mut nodes[0])?;
        }
    }
    for (i, node) in nodes.iter_mut().enumerate().skip(1) {
        wait_node(net, i, node)?;
    }
    Ok(nodes)
}

fn wait_node(net: &Net, i: usize, n: &mut Node) -> Result<()> {
    let url = format!("http://127.0.0.1:{SHOAL_PORT}/v2/");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if ns_get(&net.hosts[i], &url, 2).0 == 200 {
            return Ok(());
        }
        if let Some(st) = n.child.try_wait()? {
            bail!(
                "shoal on h{} exited ({st}) during start-up: {}",
                i + 1,
                tail(&n.log, 5)
            );
        }
        if Instant::now() > end {
            bail!(
                "shoal on h{} did not answer /v2/ within 60 s: {}",
                i + 1,
                tail(&n.log, 5)
            );
        }
        nap(Duration::from_millis(200))?;
    }
}

fn peer_id_from_log(log: &Path) -> Option<String> {
    let s = fs::read_to_string(log).ok()?;
    for line in s
        .lines()
        .filter(|l| l.contains("peer_id") || l.to_ascii_lowercase().contains("peer id"))
    {
        if let Some(i) = line.find("12D3KooW") {
            let id: String = line[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            if id.len() > 40 {
                return Some(id);
            }
        }
    }
    None
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with(field))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// Samples each process's anonymous resident memory (`RssAnon`: heap and buffers, without the
/// page-cache pages of memory-mapped blobs that `VmHWM` also counts) every 100 ms until
/// `stop`; the largest sample of each.
fn sample_rss_anon(pids: Vec<u32>, stop: &AtomicBool) -> Vec<Option<u64>> {
    let mut peak: Vec<Option<u64>> = vec![None; pids.len()];
    while !stop.load(Ordering::Relaxed) {
        for (p, pid) in peak.iter_mut().zip(&pids) {
            if let Some(v) = status_kib(*pid, "RssAnon:") {
                *p = Some(p.map_or(v, |q| q.max(v)));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    peak
}

/// `{max, mean}` of an integer field over the hosts that have it.
fn max_mean(hosts: &Value, field: &str) -> Value {
    let v: Vec<u64> = hosts
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h[field].as_u64())
        .collect();
    let mean = (!v.is_empty()).then(|| v.iter().sum::<u64>() / v.len() as u64);
    json!({"max": v.iter().max(), "mean": mean})
}

/// Sum of the samples of a metric (any labels) grouped by the value of LABEL.
fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, val)) = line.rsplit_once(' ') else {
            continue;
        };
        let (mname, labels) = series.split_once('{').unwrap_or((series, ""));
        if mname != name {
            continue;
        }
        let key = labels
            .split(',')
            .find_map(|kv| kv.trim_end_matches('}').strip_prefix(&format!("{label}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default();
        *m.entry(key).or_insert(0.0) += val.parse::<f64>().unwrap_or(0.0);
    }
    m
}

/// Waits (at most `PEER_WAIT`) until every node has a DHT connection to some peer, so that no
/// host pulls alone because discovery (mDNS, a DNS name) was slower than `--settle` on a busy
/// machine. A node still alone at the deadline is reported, and the run goes on.
fn await_peers(net: &Net) -> Result<()> {
    const PEER_WAIT: Duration = Duration::from_secs(20);
    if net.hosts.len() < 2 {
        return Ok(());
    }
    let url = format!("http://127.0.0.1:{SHOAL_PORT}/metrics");
    let start = Instant::now();
    let mut alone: Vec<usize> = (0..net.hosts.len()).collect();
    loop {
        alone.retain(|&i| {
            let (code, text) = ns_get(&net.hosts[i], &url, 2);
            let peers: f64 = metric_by_label(&text, "shoal_dht_peers_connected", "")
                .values()
                .sum();
            code != 200 || peers < 1.0
        });
        if alone.is_empty() {
            if start.elapsed() > Duration::from_millis(500) {
                eprintln!(
                    "[cluster] shoal: every node had a peer after {:.1} s more",
                    start.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
        if start.elapsed() >= PEER_WAIT {
            let names: Vec<String> = alone.iter().map(|i| format!("h{}", i + 1)).collect();
            eprintln!(
                "[cluster] shoal: WARNING {} without a peer after {} s more; pulling anyway",
                names.join(", "),
                PEER_WAIT.as_secs()
            );
            return Ok(());
        }
        nap(Duration::from_millis(200))?;
    }
}

#[allow(clippy::too_many_arguments)]
fn run_shoal(
    net: &Net,
    tmp: &Path,
    out: &Path,
    bin: &Path,
    img: &Image,
    reg_log: &Path,
    a: &RunArgs,
    ideal: f64,
    host_of_ip: &BTreeMap<String, String>,
) -> Result<Value> {
    eprintln!("[cluster] shoal: starting {} nodes", net.hosts.len());
    let key = tmp.join("cluster.key");
    fs::write(
        &key,
        format!("shoal-cluster-{}-{:x}\n", std::process::id(), rand_seed()),
    )?;
    cmd(&["chmod", "600", key.to_str().unwrap()])?;
    let mut nodes = start_nodes(net, tmp, bin, &key, a)?;
    nap(Duration::from_secs_f64(a.settle))?;
    await_peers(net)?;
    let mut peer_names: BTreeMap<String, String> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if let Some(id) = peer_id_from_log(&n.log) {
            peer_names.insert(id, format!("h{}", i + 1));
        }
    }
    // reset peak RSS so VmHWM measures the pull, not start-up
    for n in &nodes {
        let _ = fs::write(format!("/proc/{}/clear_refs", n.child.id()), "5");
    }
    let rss_idle: Vec<Option<u64>> = nodes.iter().map(|n| vm_hwm_kib(n.child.id())).collect();
    eprintln!(
        "[cluster] shoal: {} hosts pull through their local shoal",
        net.hosts.len()
    );
    let off = fs::metadata(reg_log)?.len();
    let link0 = qdisc_bytes(&net.reg, "eth0");
    let src = |_i: usize| format!("docker://127.0.0.1:{SHOAL_PORT}/{REPO}:{TAG}");
    let dir = tmp.join("pull-shoal");
    let cpu0 = cpu_jiffies();
    let node_cpu0: Vec<Option<f64>> = nodes.iter().map(|n| proc_cpu_s(n.child.id())).collect();
    let pids: Vec<u32> = nodes.iter().map(|n| n.child.id()).collect();
    let stop = AtomicBool::new(false);
    let (pulled, rss_anon) = std::thread::scope(|sc| {
        let sampler = sc.spawn(|| sample_rss_anon(pids, &stop));
        let pulled = pull_all(net, &dir, &src, a.timeout);
        stop.store(true, Ordering::Relaxed);
        (pulled, sampler.join().unwrap_or_default())
    });
    let (mut hosts, links) = pulled?;
    let cpu = cpu_busy(cpu0, cpu_jiffies());
    nap(Duration::from_millis(500))?;
    let link = qdisc_bytes(&net.reg, "eth0").saturating_sub(link0);
    let egress = registry_egress(reg_log, off, host_of_ip)?;
    let digests: Vec<&str> = img.blobs.iter().map(|b| b.0.as_str()).collect();
    for (i, h) in hosts.iter_mut().enumerate() {
        let n = &mut nodes[i];
        let pid = n.child.id();
        h["rss_peak_kib"] = json!(vm_hwm_kib(pid));
        h["rss_anon_peak_kib"] = json!(rss_anon.get(i).copied().flatten());
        h["rss_idle_kib"] = json!(rss_idle[i]);
        h["node_cpu_s"] = match (proc_cpu_s(pid), node_cpu0[i]) {
            (Some(b), Some(a0)) => r3(b - a0),
            _ => Value::Null,
        };
        h["node_alive"] = json!(n.child.try_wait()?.is_none());
        let (code, body) = ns_get(
            &net.hosts[i],
            &format!("http://127.0.0.1:{SHOAL_PORT}/_shoal/pulls"),
            10,
        );
        let mut src = json!({"upstream": 0, "peers": 0, "served_from_cache": 0, "served_while_arriving": 0, "by_peer": {}, "states": {}});
        if code == 200 {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            fs::write(
                out.join("logs").join(format!("pulls-h{}.json", i + 1)),
                &body,
            )?;
            let (mut up, mut peers, mut cache, mut arriving) = (0u64, 0u64, 0u64, 0u64);
            let mut by_peer: BTreeMap<String, u64> = BTreeMap::new();
            let mut states: BTreeMap<String, u64> = BTreeMap::new();
            let mut site_roles: BTreeMap<String, u64> = BTreeMap::new();
            for r in v["pulls"].as_array().into_iter().flatten() {
                if !digests.contains(&r["digest"].as_str().unwrap_or("")) {
                    continue;
                }
                up += r["fetched_from_upstream"].as_u64().unwrap_or(0);
                cache += r["served_from_cache"].as_u64().unwrap_or(0);
                arriving += r["served_while_arriving"].as_u64().unwrap_or(0);
                for (p, b) in r["fetched_from_peers"].as_object().into_iter().flatten() {
                    let b = b.as_u64().unwrap_or(0);
                    peers += b;
                    *by_peer
                        .entry(peer_names.get(p).cloned().unwrap_or_else(|| p.clone()))
                        .or_default() += b;
                }
                *states
                    .entry(r["state"].as_str().unwrap_or("?").to_string())
                    .or_default() += 1;
                if let Some(role) = r["site_role"].as_str() {
                    *site_roles.entry(role.to_string()).or_default() += 1;
                }
            }
            src = json!({"upstream": up, "peers": peers, "served_from_cache": cache, "served_while_arriving": arriving,
                         "by_peer": by_peer, "states": states, "site_roles": site_roles});
        } else {
            src["error"] = json!(format!("GET /_shoal/pulls -> {code}"));
        }
        h["bytes_by_source"] = src;
        let (mc, metrics) = ns_get(
            &net.hosts[i],
            &format!("http://127.0.0.1:{SHOAL_PORT}/metrics"),
            10,
        );
        if mc == 200 {
            fs::write(
                out.join("logs").join(format!("metrics-h{}.txt", i + 1)),
                &metrics,
            )?;
            let served = metric_by_label(&metrics, "shoal_served_bytes_total", "source");
            let peer_served = metric_by_label(&metrics, "shoal_peer_served_bytes_total", "");
            h["metrics"] = json!({"served_bytes_by_source": served,
                                  "peer_served_bytes": peer_served.values().sum::<f64>()});
        }
    }
    // stop the nodes, keep their logs
    for n in nodes.iter_mut() {
        kill(n.child.id(), "TERM");
    }
    let end = Instant::now() + Duration::from_secs(15);
    for n in nodes.iter_mut() {
        while n.child.try_wait()?.is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = n.child.kill();
        let _ = n.child.wait();
    }
    for (i, n) in nodes.iter().enumerate() {
        let _ = fs::copy(
            &n.log,
            out.join("logs").join(format!("shoal-h{}.log", i + 1)),
        );
    }
    verify_copies(&mut hosts, img);
    let mut s = summarise("shoal", hosts, egress, link, img, ideal);
    for field in ["rss_peak_kib", "rss_anon_peak_kib"] {
        s[field] = max_mean(&s["hosts"], field);
    }
    s["peer_names"] = json!(peer_names);
    s["machine_cpu_busy"] = cpu;
    s["links"] = links;
    let cpus: Vec<f64> = s["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["node_cpu_s"].as_f64())
        .collect();
    s["node_cpu_s_total"] = r3(cpus.iter().sum());
    Ok(s)
}

fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ (std::process::id() as u64) << 32
}

// ------------------------------------------------------------------------------------------------
// Chart

/// Fraction of hosts done vs seconds, one step line per phase, and the ideal (every host done at
/// image size / link rate).
fn chart_svg(phases: &[(&str, &str, Vec<f64>, usize)], ideal: f64, title: &str) -> String {
    // the legend goes below the plot, one line per series (the ideal + each phase)
    let legend_h = 18.0 * (phases.len() + 1) as f64 + 8.0;
    let (w, h) = (760.0, 440.0 + legend_h);
    let (ml, mr, mt, mb) = (64.0, 24.0, 48.0, 56.0 + legend_h);
    let tmax_data = phases
        .iter()
        .flat_map(|p| p.2.iter().copied())
        .fold(ideal, f64::max);
    let step = nice_step(tmax_data * 1.05 / 8.0);
    let tmax = (tmax_data * 1.05 / step).ceil() * step;
    let x = |t: f64| ml + (w - ml - mr) * t / tmax;
    let y = |f: f64| h - mb - (h - mt - mb) * f;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{}</text>
"#,
        w / 2.0,
        xml_escape(title)
    );
    // grid and axes
    let mut t = 0.0;
    while t <= tmax + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#e0e0e0"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{4}</text>"##,
            x(t),
            y(0.0),
            y(1.0),
            y(0.0) + 16.0,
            fmt_num(t)
        );
        t += step;
    }
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#e0e0e0"/><text x="{3:.1}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            x(0.0),
            y(f),
            x(tmax),
            x(0.0) - 6.0,
            y(f) + 4.0,
            f
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="black"/><line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{3:.1}" stroke="black"/>"##,
        x(0.0),
        y(0.0),
        x(tmax),
        y(1.0)
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the pulls started</text>"#,
        (ml + w - mr) / 2.0,
        h - legend_h - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">fraction of hosts done</text>"#,
        (mt + h - mb) / 2.0
    );
    // ideal
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#2ca02c" stroke-width="2" stroke-dasharray="6,4" points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1}"/>"##,
        x(0.0),
        y(0.0),
        x(ideal),
        y(0.0),
        x(ideal),
        y(1.0),
        x(tmax),
        y(1.0)
    );
    let mut legend = vec![(
        "#2ca02c",
        format!(
            "ideal: size / link rate = {} s",
            fmt_num((ideal * 10.0).round() / 10.0)
        ),
        true,
    )];
    for (name, color, times, total) in phases {
        let mut ts = times.clone();
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let mut pts = format!("{:.1},{:.1}", x(0.0), y(0.0));
        for (k, t) in ts.iter().enumerate() {
            let _ = write!(
                pts,
                " {:.1},{:.1} {:.1},{:.1}",
                x(*t),
                y(k as f64 / *total as f64),
                x(*t),
                y((k + 1) as f64 / *total as f64)
            );
        }
        let last = ts.last().copied().unwrap_or(0.0);
        let _ = write!(
            pts,
            " {:.1},{:.1}",
            x(tmax.max(last)),
            y(ts.len() as f64 / *total as f64)
        );
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2.5" points="{pts}"/>"#
        );
        let label = if ts.is_empty() {
            format!("{name}: no host done")
        } else {
            format!(
                "{name}: p50 {} s, max {} s ({}/{} done)",
                fmt_num((percentile(&ts, 50.0) * 10.0).round() / 10.0),
                fmt_num((last * 10.0).round() / 10.0),
                ts.len(),
                total
            )
        };
        legend.push((color, label, false));
    }
    for (k, (color, label, dashed)) in legend.iter().enumerate() {
        let ly = h - legend_h + 8.0 + 18.0 * k as f64;
        let lx = ml;
        let dash = if *dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2.5"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            xml_escape(label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1e-3);
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * mag >= raw {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v}")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

// ------------------------------------------------------------------------------------------------
// The run

fn preflight(a: &RunArgs) -> Result<()> {
    let uid = fs::read_to_string("/proc/self/status")?
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default();
    if uid != "0" {
        bail!("needs root (network namespaces, tc)");
    }
    cmd(&["ip", "netns", "list"]).context("`ip netns` does not work here")?;
    for c in ["tc", "skopeo", "docker-registry", "curl", "sha256sum"] {
        cmd_quiet(&["sh", "-c", &format!("command -v {c}")])
            .ok_or_else(|| anyhow!("missing command: {c}"))?;
    }
    if a.hosts == 0 || a.hosts > 200 {
        bail!("--hosts must be 1..=200");
    }
    if a.sites > a.hosts {
        bail!("--sites must not exceed --hosts");
    }
    for (what, p) in [("--shoal", &a.shoal), ("--imagegen", &a.imagegen)] {
        if !p.is_file() {
            bail!(
                "{what} {} not found (cargo build -p shoal-node -p shoal-tools)",
                p.display()
            );
        }
    }
    Ok(())
}

fn run(a: RunArgs) -> Result<()> {
    preflight(&a)?;
    let rate = parse_rate(&a.rate)?;
    let reg_rate = parse_rate(&a.registry_rate)?;
    let wan_rate = parse_rate(&a.wan_rate)?;
    let run_id = format!("{PREFIX}{}", std::process::id());
    let tmp = PathBuf::from("/tmp").join(&run_id);
    if let Ok(mut g) = CURRENT_RUN.lock() {
        *g = Some(run_id.clone());
    }
    let _teardown = Teardown {
        run: run_id.clone(),
        tmp: tmp.clone(),
        keep: a.keep,
    };
    fs::create_dir_all(tmp.join("bin"))?;
    fs::create_dir_all(a.out.join("logs"))?;
    // copies, so a concurrent rebuild cannot swap them mid-run
    let shoal = tmp.join("bin/shoal");
    let imagegen = tmp.join("bin/shoal-imagegen");
    fs::copy(&a.shoal, &shoal).context("copy shoal")?;
    fs::copy(&a.imagegen, &imagegen).context("copy shoal-imagegen")?;
    let shoal_version = cmd_quiet(&[shoal.to_str().unwrap(), "--version"])
        .unwrap_or_default()
        .trim()
        .to_string();
    let seed = a.seed.unwrap_or_else(|| rand_seed() % 1_000_000_000);

    eprintln!(
        "[cluster] run {run_id}: generating the image ({} in {} layers, seed {seed})",
        a.image_size, a.layers
    );
    let img = gen_image(&imagegen, &tmp.join("image"), &a, seed)?;
    let ideal = img.blob_bytes as f64 * 8.0 / rate as f64;
    eprintln!(
        "[cluster] image {} = {} blob bytes; ideal {:.1} s at {}",
        img.manifest_digest,
        img.blob_bytes,
        ideal,
        human_rate(rate)
    );

    eprintln!(
        "[cluster] building the network: {} hosts at {}, registry at {}{}",
        a.hosts,
        human_rate(rate),
        human_rate(reg_rate),
        if a.sites > 0 {
            format!(
                ", {} sites joined by {} WAN links",
                a.sites,
                human_rate(wan_rate)
            )
        } else {
            String::new()
        }
    );
    let net = build_net(&a, &run_id, rate, reg_rate, wan_rate)?;
    let host_of_ip: BTreeMap<String, String> = (0..a.hosts)
        .map(|i| (Net::host_ip(i), format!("h{}", i + 1)))
        .collect();
    // with a delay, docker-registry listens on loopback behind the delay relay on REG_PORT
    let reg_port = if a.upstream_delay_ms > 0 {
        REG_PORT + 1
    } else {
        REG_PORT
    };
    let reg_listen = if a.upstream_delay_ms > 0 {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    };
    let (_registry, reg_log) = start_registry(&net, &tmp, reg_listen, reg_port)?;
    let _relay = if a.upstream_delay_ms > 0 {
        let script = tmp.join("bin/delay_relay.py");
        fs::copy(&a.relay_script, &script)
            .with_context(|| format!("copy {}", a.relay_script.display()))?;
        let log = tmp.join("registry/relay.log");
        let (l, t, d) = (
            format!("0.0.0.0:{REG_PORT}"),
            format!("127.0.0.1:{reg_port}"),
            a.upstream_delay_ms.to_string(),
        );
        let child = ns_spawn(
            &net.reg,
            &[
                "/usr/bin/python3",
                script.to_str().unwrap(),
                "--listen",
                &l,
                "--target",
                &t,
                "--delay-ms",
                &d,
            ],
            &[],
            &log,
        )?;
        let url = format!("http://127.0.0.1:{REG_PORT}/v2/");
        let end = Instant::now() + Duration::from_secs(20);
        while ns_get(&net.reg, &url, 5).0 != 200 {
            if Instant::now() > end {
                bail!("delay relay did not come up: {}", tail(&log, 5));
            }
            nap(Duration::from_millis(200))?;
        }
        Some(child)
    } else {
        None
    };
    // push over the registry namespace's loopback (unshaped, not delayed)
    let src = format!("oci:{}:{TAG}", tmp.join("image").display());
    let dst = format!("docker://127.0.0.1:{reg_port}/{REPO}:{TAG}");
    ns_cmd(
        &net.reg,
        &[
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &src,
            &dst,
        ],
    )
    .context("push the image")?;
    fs::remove_dir_all(tmp.join("image")).ok();

    let mut report = json!({
        "run": run_id,
        "started_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs(),
        "shoal_version": shoal_version,
        "loadavg_start": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "config": {
            "hosts": a.hosts, "rate_bit_s": rate, "registry_rate_bit_s": reg_rate, "sites": a.sites, "queue_ms": a.queue_ms, "site_labels": a.sites > 0 && !a.no_site_labels, "mdns": a.mdns, "dns_peers": a.dns_peers,
            "wan_rate_bit_s": if a.sites > 0 { json!(wan_rate) } else { Value::Null },
            "image_size": a.image_size, "layers": a.layers, "seed": seed, "settle_s": a.settle,
            "shoal_args": a.shoal_args, "timeout_s": a.timeout,
            "upstream_delay_ms": a.upstream_delay_ms,
        },
        "image": {"manifest_digest": img.manifest_digest, "blob_bytes": img.blob_bytes,
                  "blobs": img.blobs.iter().map(|(d, s)| json!({"digest": d, "size": s})).collect::<Vec<_>>()},
        "ideal_s": r3(ideal),
    });
    let write_report = |report: &Value| -> Result<()> {
        fs::write(
            a.out.join("report.json"),
            serde_json::to_string_pretty(report)?,
        )?;
        Ok(())
    };
    if !a.no_baseline {
        let b = run_baseline(&net, &tmp, &img, &reg_log, &a, ideal, &host_of_ip)?;
        print_phase(&b);
        report["baseline"] = b;
        write_report(&report)?;
    }
    if !a.no_shoal {
        let s = run_shoal(
            &net,
            &tmp,
            &a.out,
            &shoal,
            &img,
            &reg_log,
            &a,
            ideal,
            &host_of_ip,
        )?;
        print_phase(&s);
        report["shoal"] = s;
        write_report(&report)?;
    }
    let _ = fs::copy(&reg_log, a.out.join("logs/registry.log"));
    fs::write(a.out.join("completion.svg"), chart_from_report(&report))?;
    report["chart"] = json!(a.out.join("completion.svg").display().to_string());
    report["loadavg_end"] = json!(fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim());
    write_report(&report)?;
    eprintln!(
        "[cluster] report: {}  chart: {}",
        a.out.join("report.json").display(),
        a.out.join("completion.svg").display()
    );
    Ok(())
}

/// The completion chart of a report (also `shoal-cluster chart REPORT`).
fn chart_from_report(report: &Value) -> String {
    let c = &report["config"];
    let hosts = c["hosts"].as_u64().unwrap_or(0) as usize;
    let times = |k: &str| -> Vec<f64> {
        report[k]["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h["ok"] == true)
            .filter_map(|h| h["seconds"].as_f64())
            .collect()
    };
    let mut phases = Vec::new();
    if !report["shoal"].is_null() {
        phases.push(("shoal", "#1f77b4", times("shoal"), hosts));
    }
    if !report["baseline"].is_null() {
        phases.push((
            "baseline (registry direct)",
            "#ff7f0e",
            times("baseline"),
            hosts,
        ));
    }
    let rate = |k: &str| human_rate(c[k].as_u64().unwrap_or(0));
    let title = format!(
        "{} hosts at {}, image {} B ({} layers), registry link {}{}{}",
        hosts,
        rate("rate_bit_s"),
        report["image"]["blob_bytes"],
        c["layers"],
        rate("registry_rate_bit_s"),
        if c["sites"].as_u64().unwrap_or(0) > 0 {
            format!(", {} sites / {} WAN", c["sites"], rate("wan_rate_bit_s"))
        } else {
            String::new()
        },
        match c["upstream_delay_ms"].as_u64() {
            Some(d) if d > 0 => format!(", +{d} ms to the registry"),
            _ => String::new(),
        }
    );
    chart_svg(&phases, report["ideal_s"].as_f64().unwrap_or(0.0), &title)
}

fn print_phase(p: &Value) {
    eprintln!(
        "[cluster] {}: {}/{} hosts done, digests ok: {}; p50 {} s, p99 {} s, max {} s; ratio to ideal (max) {}; upstream {} copies (log), {} (link bytes){}",
        p["phase"].as_str().unwrap_or("?"),
        p["hosts_completed"], p["hosts_total"], p["digests_ok"], p["p50_s"], p["p99_s"], p["max_s"],
        p["ratio_to_ideal"]["max"], p["upstream"]["copies"], p["upstream"]["registry_link_copies_tc"],
        if p["rss_peak_kib"].is_null() { String::new() } else { format!("; peak RSS max {} KiB (anonymous {} KiB)", p["rss_peak_kib"]["max"], p["rss_anon_peak_kib"]["max"]) }
    );
    eprintln!(
        "[cluster] {}: machine CPU busy {} (all cores){}",
        p["phase"].as_str().unwrap_or("?"),
        p["machine_cpu_busy"],
        if p["node_cpu_s_total"].is_null() {
            String::new()
        } else {
            format!("; shoal nodes used {} CPU-s", p["node_cpu_s_total"])
        }
    );
    eprintln!(
        "[cluster] {}: host downloads used {} of their link until done (mean); uploads {} until the last host finished",
        p["phase"].as_str().unwrap_or("?"),
        p["links"]["down_use_mean"],
        p["links"]["up_use_until_last"],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_sizes() {
        assert_eq!(parse_rate("200mbit").unwrap(), 200_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("1.5mbit").unwrap(), 1_500_000);
        assert!(parse_rate("200xb").is_err());
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("12345").unwrap(), 12345);
    }

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.0);
        assert_eq!(percentile(&v, 99.0), 4.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
    }

    #[test]
    fn metrics_parse() {
        let t = "# HELP x\nshoal_served_bytes_total{source=\"cache\"} 10\nshoal_served_bytes_total{source=\"peer\"} 5\nshoal_served_bytes_total{source=\"cache\",x=\"y\"} 1\n";
        let m = metric_by_label(t, "shoal_served_bytes_total", "source");
        assert_eq!(m["cache"], 11.0);
        assert_eq!(m["peer"], 5.0);
    }

    #[test]
    fn chart_is_svg() {
        let s = chart_svg(&[("shoal", "#1f77b4", vec![1.0, 2.0], 3)], 1.5, "t <x>");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("t &lt;x&gt;"));
    }
}
