//! `shoal-imagegen`: writes a deterministic test image as an OCI image layout.
//!
//! ```text
//! shoal-imagegen --out DIR --tag TAG [--seed S] [--layers N] [--layer-size BYTES]
//!                [--platform linux/amd64 --platform linux/arm64 ...] [--format oci|docker] [--index]
//!                [--layout oci|dir]
//! ```
//!
//! Prints one JSON line describing what was written:
//! `{"manifest_digest", "media_type", "size", "tag", "blobs": [{"digest","size","media_type"}],
//!   "manifests": [{"platform","digest","size","config","layers"}], "total_bytes"}`.
//! Push it with `skopeo copy [--all] oci:DIR:TAG docker://HOST/REPO:TAG`, or, with
//! `--layout dir` (needed for `--format docker` with skopeo 1.9),
//! `skopeo copy [--all] dir:DIR docker://HOST/REPO:TAG`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use shoal_node::imagegen::{self, Format, ImageSpec};

#[derive(Debug, Parser)]
#[command(
    name = "shoal-imagegen",
    about = "Generate a deterministic multi-layer OCI/Docker image and write it as an OCI image layout"
)]
struct Cli {
    /// Directory of the OCI image layout (created if missing; other tags in it are kept).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Tag recorded in index.json (org.opencontainers.image.ref.name).
    #[arg(long, value_name = "TAG")]
    tag: String,

    /// Seed of all generated content: the same arguments always give the same digests.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Number of layers per platform.
    #[arg(long, default_value_t = 3)]
    layers: usize,

    /// Approximate uncompressed size of each layer: bytes, or with a suffix K, M, G (powers of
    /// 1024; KiB/MiB/GiB also accepted).
    #[arg(long, value_name = "BYTES", default_value = "1MiB", value_parser = parse_size)]
    layer_size: usize,

    /// Platform os/arch[/variant]; repeat for a multi-arch index. Default linux/amd64.
    #[arg(long = "platform", value_name = "OS/ARCH", value_parser = imagegen::parse_platform)]
    platforms: Vec<(String, String)>,

    /// Media types of the manifests: oci or docker.
    #[arg(long, default_value = "oci", value_parser = parse_format)]
    format: Format,

    /// Emit an index / manifest list even for a single platform.
    #[arg(long)]
    index: bool,

    /// Directory layout: `oci` (OCI image layout, push with `skopeo copy oci:DIR:TAG`) or `dir`
    /// (skopeo's dir: transport, push with `skopeo copy dir:DIR`; needed for --format docker with
    /// skopeo 1.9, whose oci: transport rejects Docker media types). `dir` replaces DIR's content.
    #[arg(long, default_value = "oci", value_parser = ["oci", "dir"])]
    layout: String,
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse().map_err(|e: imagegen::SpecError| e.to_string())
}

/// Upper bound on the total generated payload; everything is built in memory.
const MAX_TOTAL: u128 = 4 << 30;

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid size {s:?} (expected e.g. 1048576, 512K, 64MiB)"
        ));
    }
    let n: u128 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    let bytes = n * mult;
    if bytes > MAX_TOTAL {
        return Err(format!("size {s:?} is larger than the 4 GiB limit"));
    }
    usize::try_from(bytes).map_err(|_| format!("size {s:?} too large"))
}

fn valid_tag(tag: &str) -> bool {
    // OCI distribution spec: [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    let mut chars = tag.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && tag.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

fn run(cli: Cli) -> Result<()> {
    if !valid_tag(&cli.tag) {
        bail!(
            "invalid tag {:?}: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}",
            cli.tag
        );
    }
    if cli.layers == 0 {
        bail!("--layers must be at least 1");
    }
    let mut platforms = cli.platforms;
    if platforms.is_empty() {
        platforms.push(("linux".to_owned(), "amd64".to_owned()));
    }
    let mut seen = std::collections::HashSet::new();
    for p in &platforms {
        if !seen.insert(p) {
            bail!("platform {}/{} given twice", p.0, p.1);
        }
    }
    let total = (cli.layers as u128) * (cli.layer_size as u128) * (platforms.len() as u128);
    if total > MAX_TOTAL {
        bail!("layers x layer-size x platforms = {total} bytes exceeds the 4 GiB limit");
    }

    let spec = ImageSpec {
        seed: cli.seed,
        layers: cli.layers,
        layer_size: cli.layer_size,
        platforms,
        format: cli.format,
        force_index: cli.index,
    };
    let image = imagegen::generate(&spec);
    if cli.layout == "dir" {
        if cli.out.exists() {
            std::fs::remove_dir_all(&cli.out)
                .with_context(|| format!("clearing {}", cli.out.display()))?;
        }
        imagegen::write_dir_layout(&image, &cli.out)
            .with_context(|| format!("writing dir: layout to {}", cli.out.display()))?;
    } else {
        imagegen::write_oci_layout(&image, &cli.out, &cli.tag)
            .with_context(|| format!("writing OCI layout to {}", cli.out.display()))?;
    }

    let blobs: Vec<_> = image
        .blobs
        .iter()
        .map(|(d, b)| json!({ "digest": d, "size": b.data.len(), "media_type": b.media_type }))
        .collect();
    let manifests: Vec<_> = image
        .platforms
        .iter()
        .map(|p| {
            json!({
                "platform": p.platform_string(),
                "digest": p.manifest_digest,
                "size": p.manifest_size,
                "config": p.config_digest,
                "layers": p.layer_digests,
                "diff_ids": p.diff_ids,
            })
        })
        .collect();
    let out = json!({
        "manifest_digest": image.manifest_digest,
        "media_type": image.media_type,
        "size": image.manifest.len(),
        "tag": cli.tag,
        "blobs": blobs,
        "manifests": manifests,
        "total_bytes": image.total_bytes(),
    });
    println!("{out}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's message without the usage block and tips.
            let rendered = e.render().to_string();
            let msg = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect::<Vec<_>>()
                .join(" ");
            let msg = msg.trim_start_matches("error: ");
            eprintln!("shoal-imagegen: {msg} (see --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-imagegen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
