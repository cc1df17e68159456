//! Deterministic generator of OCI / Docker container images.
//!
//! [`generate`] turns an [`ImageSpec`] (a seed, a layer count and size, a list of platforms and a
//! manifest format) into an [`Image`]: every blob (gzip-compressed tar layers, image configs,
//! per-platform manifests) plus the top-level manifest (a single image manifest, or an image index
//! / manifest list when more than one platform is asked for). The same spec always yields
//! byte-identical output, so tests can recompute expected digests instead of storing fixtures.
//!
//! Layers are real `tar.gz` archives (docker, containerd and podman unpack them) holding a few
//! files of pseudo-random content (ChaCha-based [`StdRng`]) that add up to about
//! `layer_size` bytes. Each (platform, layer) pair gets its own independent random stream, so
//! layers never repeat across platforms or positions.
//!
//! [`write_oci_layout`] writes an [OCI image layout] directory that `skopeo copy oci:DIR:TAG ...`
//! can push to a registry; [`write_dir_layout`] writes skopeo's `dir:` layout, which skopeo 1.9
//! also accepts for Docker media types.
//!
//! [OCI image layout]: https://github.com/opencontainers/image-spec/blob/main/image-layout.md

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker image manifest (schema 2) media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer media type.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Annotation carrying the tag of a manifest in an OCI layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Fixed timestamp used for every mtime and `created` field (2024-01-01T00:00:00Z).
const EPOCH: u64 = 1_704_067_200;
const EPOCH_RFC3339: &str = "2024-01-01T00:00:00Z";

/// Which family of media types the generated manifests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Format {
    /// `application/vnd.oci.image.*` media types.
    #[default]
    Oci,
    /// `application/vnd.docker.distribution.manifest.*` (schema 2) media types.
    Docker,
}

impl Format {
    /// Media type of a single-platform image manifest.
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_MANIFEST,
            Format::Docker => DOCKER_MANIFEST,
        }
    }

    /// Media type of a multi-platform index / manifest list.
    pub fn index_media_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_INDEX,
            Format::Docker => DOCKER_MANIFEST_LIST,
        }
    }

    /// Media type of the image config blob.
    pub fn config_media_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_CONFIG,
            Format::Docker => DOCKER_CONFIG,
        }
    }

    /// Media type of a gzip-compressed layer.
    pub fn layer_media_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_LAYER_GZIP,
            Format::Docker => DOCKER_LAYER_GZIP,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Oci => "oci",
            Format::Docker => "docker",
        })
    }
}

/// Error for an unparsable [`Format`] or platform string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The format name is neither `oci` nor `docker`.
    #[error("unknown image format {0:?} (expected \"oci\" or \"docker\")")]
    UnknownFormat(String),
    /// A platform string is not `os/arch[/variant]`.
    #[error("invalid platform {0:?} (expected os/arch or os/arch/variant, e.g. linux/amd64)")]
    BadPlatform(String),
}

impl FromStr for Format {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "oci" => Ok(Format::Oci),
            "docker" | "docker-v2" | "v2s2" => Ok(Format::Docker),
            _ => Err(SpecError::UnknownFormat(s.to_owned())),
        }
    }
}

/// Parses `os/arch` or `os/arch/variant` into the `(os, arch)` pair used by
/// [`ImageSpec::platforms`]; a variant stays attached to the architecture (`arm64/v8`).
pub fn parse_platform(s: &str) -> Result<(String, String), SpecError> {
    let bad = || SpecError::BadPlatform(s.to_owned());
    let mut parts = s.split('/');
    let os = parts.next().ok_or_else(bad)?;
    let arch = parts.next().ok_or_else(bad)?;
    let variant = parts.next();
    if parts.next().is_some() {
        return Err(bad());
    }
    let ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    };
    if !ok(os) || !ok(arch) || variant.is_some_and(|v| !ok(v)) {
        return Err(bad());
    }
    Ok(match variant {
        Some(v) => (os.to_owned(), format!("{arch}/{v}")),
        None => (os.to_owned(), arch.to_owned()),
    })
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Seed of every pseudo-random byte; same seed (and other fields) → same digests.
    pub seed: u64,
    /// Number of layers per platform.
    pub layers: usize,
    /// Approximate uncompressed payload size of each layer in bytes.
    pub layer_size: usize,
    /// `(os, architecture)` pairs; the architecture may carry a variant as `arm64/v8`.
    /// One platform gives a plain image manifest; several give an index / manifest list.
    pub platforms: Vec<(String, String)>,
    /// OCI or Docker media types.
    pub format: Format,
    /// Emit an index / manifest list even for a single platform.
    pub force_index: bool,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            seed: 1,
            layers: 3,
            layer_size: 1 << 20,
            platforms: vec![("linux".to_owned(), "amd64".to_owned())],
            format: Format::Oci,
            force_index: false,
        }
    }
}

impl ImageSpec {
    /// Whether [`generate`] produces an index / manifest list at the top.
    pub fn is_index(&self) -> bool {
        self.force_index || self.platforms.len() > 1
    }
}

/// One content-addressed object of an image.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob {
    /// Media type under which it is referenced.
    pub media_type: String,
    /// The bytes; `sha256(data)` is its digest.
    pub data: Vec<u8>,
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blob")
            .field("media_type", &self.media_type)
            .field("size", &self.data.len())
            .finish()
    }
}

/// The generated image of one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformImage {
    /// Operating system (`linux`).
    pub os: String,
    /// Architecture without variant (`arm64`).
    pub architecture: String,
    /// Architecture variant (`v8`), if any.
    pub variant: Option<String>,
    /// Digest of this platform's image manifest.
    pub manifest_digest: String,
    /// Size of this platform's image manifest in bytes.
    pub manifest_size: usize,
    /// Digest of the image config blob.
    pub config_digest: String,
    /// Digests of the compressed layers, bottom first.
    pub layer_digests: Vec<String>,
    /// `sha256` of each uncompressed layer tar (the config's `rootfs.diff_ids`).
    pub diff_ids: Vec<String>,
}

impl PlatformImage {
    /// `os/arch[/variant]`.
    pub fn platform_string(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{}", self.os, self.architecture, v),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// A generated image: all its blobs plus the top-level manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Every object other than the top-level manifest, by digest: layers, configs and (for an
    /// index) the per-platform manifests.
    pub blobs: BTreeMap<String, Blob>,
    /// Bytes of the top-level manifest (image manifest, or index / manifest list).
    pub manifest: Vec<u8>,
    /// `sha256:<hex>` of [`Image::manifest`].
    pub manifest_digest: String,
    /// Media type of [`Image::manifest`].
    pub media_type: String,
    /// Per-platform details, in the order of [`ImageSpec::platforms`].
    pub platforms: Vec<PlatformImage>,
}

impl Image {
    /// Sum of the sizes of every blob and of the top-level manifest.
    pub fn total_bytes(&self) -> u64 {
        let blobs: u64 = self.blobs.values().map(|b| b.data.len() as u64).sum();
        blobs + self.manifest.len() as u64
    }

    /// Whether the top-level manifest is an index / manifest list.
    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX || self.media_type == DOCKER_MANIFEST_LIST
    }

    /// Looks up any object, the top-level manifest included, by digest.
    pub fn get(&self, digest: &str) -> Option<(&str, &[u8])> {
        if digest == self.manifest_digest {
            return Some((&self.media_type, &self.manifest));
        }
        self.blobs
            .get(digest)
            .map(|b| (b.media_type.as_str(), b.data.as_slice()))
    }
}

/// `sha256:<64 lowercase hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Generates the image described by `spec`.
///
/// Panics only if `spec.platforms` is empty (there is nothing to describe then).
pub fn generate(spec: &ImageSpec) -> Image {
    assert!(
        !spec.platforms.is_empty(),
        "ImageSpec::platforms must name at least one platform"
    );
    let format = spec.format;
    let mut blobs = BTreeMap::new();
    let mut platforms = Vec::with_capacity(spec.platforms.len());
    let mut manifests = Vec::with_capacity(spec.platforms.len());

    for (os, arch_variant) in &spec.platforms {
        let (architecture, variant) = match arch_variant.split_once('/') {
            Some((a, v)) => (a.to_owned(), Some(v.to_owned())),
            None => (arch_variant.clone(), None),
        };
        let plat_label = format!("{os}/{arch_variant}");

        let mut layer_descs = Vec::with_capacity(spec.layers);
        let mut layer_digests = Vec::with_capacity(spec.layers);
        let mut diff_ids = Vec::with_capacity(spec.layers);
        for index in 0..spec.layers {
            let layer = make_layer(spec.seed, &plat_label, index, spec.layer_size);
            let digest = sha256_digest(&layer.compressed);
            layer_descs.push(json!({
                "mediaType": format.layer_media_type(),
                "digest": digest,
                "size": layer.compressed.len(),
            }));
            layer_digests.push(digest.clone());
            diff_ids.push(layer.diff_id);
            blobs.insert(
                digest,
                Blob {
                    media_type: format.layer_media_type().to_owned(),
                    data: layer.compressed,
                },
            );
        }

        let config = make_config(spec.seed, os, &architecture, variant.as_deref(), &diff_ids);
        let config_digest = sha256_digest(&config);
        let config_size = config.len();
        blobs.insert(
            config_digest.clone(),
            Blob {
                media_type: format.config_media_type().to_owned(),
                data: config,
            },
        );

        let manifest = to_json_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": format.manifest_media_type(),
            "config": {
                "mediaType": format.config_media_type(),
                "digest": config_digest,
                "size": config_size,
            },
            "layers": layer_descs,
        }));
        let manifest_digest = sha256_digest(&manifest);
        let manifest_size = manifest.len();
        platforms.push(PlatformImage {
            os: os.clone(),
            architecture,
            variant,
            manifest_digest,
            manifest_size,
            config_digest,
            layer_digests,
            diff_ids,
        });
        manifests.push(manifest);
    }

    if !spec.is_index() {
        let manifest = manifests.pop().expect("exactly one platform");
        return Image {
            manifest_digest: sha256_digest(&manifest),
            manifest,
            media_type: format.manifest_media_type().to_owned(),
            blobs,
            platforms,
        };
    }

    let mut entries = Vec::with_capacity(platforms.len());
    for (plat, manifest) in platforms.iter().zip(manifests) {
        let mut platform = json!({ "architecture": plat.architecture, "os": plat.os });
        if let Some(v) = &plat.variant {
            platform["variant"] = json!(v);
        }
        entries.push(json!({
            "mediaType": format.manifest_media_type(),
            "digest": plat.manifest_digest,
            "size": plat.manifest_size,
            "platform": platform,
        }));
        blobs.insert(
            plat.manifest_digest.clone(),
            Blob {
                media_type: format.manifest_media_type().to_owned(),
                data: manifest,
            },
        );
    }
    let index = to_json_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": format.index_media_type(),
        "manifests": entries,
    }));
    Image {
        manifest_digest: sha256_digest(&index),
        manifest: index,
        media_type: format.index_media_type().to_owned(),
        blobs,
        platforms,
    }
}

/// Writes `image` as an OCI image layout under `dir` (created if missing), tagging its top-level
/// manifest `tag` in `index.json`. An existing layout in `dir` is kept: other tags stay, an entry
/// with the same tag is replaced.
pub fn write_oci_layout(image: &Image, dir: &Path, tag: &str) -> io::Result<()> {
    let blob_dir = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blob_dir)?;
    fs::write(
        dir.join("oci-layout"),
        to_json_bytes(&json!({ "imageLayoutVersion": "1.0.0" })),
    )?;

    let objects = image
        .blobs
        .iter()
        .map(|(d, b)| (d.as_str(), b.data.as_slice()))
        .chain(std::iter::once((
            image.manifest_digest.as_str(),
            image.manifest.as_slice(),
        )));
    for (digest, data) in objects {
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad digest {digest}"))
        })?;
        let path = blob_dir.join(hex);
        if fs::metadata(&path).is_ok_and(|m| m.len() == data.len() as u64) {
            continue; // content-addressed: same name and size means same bytes
        }
        let tmp = blob_dir.join(format!(".{hex}.tmp"));
        fs::write(&tmp, data)?;
        fs::rename(&tmp, &path)?;
    }

    let index_path = dir.join("index.json");
    let mut others = Vec::new();
    match fs::read(&index_path) {
        Ok(bytes) => {
            let existing: Value = serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", index_path.display()),
                )
            })?;
            if let Some(list) = existing.get("manifests").and_then(Value::as_array) {
                others.extend(
                    list.iter()
                        .filter(|m| {
                            m.pointer("/annotations/org.opencontainers.image.ref.name")
                                .and_then(Value::as_str)
                                != Some(tag)
                        })
                        .cloned(),
                );
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    others.push(json!({
        "mediaType": image.media_type,
        "digest": image.manifest_digest,
        "size": image.manifest.len(),
        "annotations": { REF_NAME_ANNOTATION: tag },
    }));
    let index = to_json_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": others,
    }));
    let tmp = dir.join(".index.json.tmp");
    fs::write(&tmp, index)?;
    fs::rename(&tmp, &index_path)
}

/// Writes `image` in the layout of the `dir:` transport of containers/image (skopeo): a
/// `version` file, `manifest.json` (the top-level manifest), every blob under its bare hex digest
/// and, for an index, each per-platform manifest as `<hex>.manifest.json`.
///
/// Unlike [`write_oci_layout`], this keeps Docker media types usable: skopeo 1.9's `oci:`
/// transport only accepts OCI media types in `index.json`, so push a [`Format::Docker`] image
/// with `skopeo copy [--all] dir:DIR docker://...`. `dir` should be empty or missing.
pub fn write_dir_layout(image: &Image, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("version"), "Directory Transport Version: 1.1\n")?;
    let child_manifests: std::collections::HashSet<&str> = if image.is_index() {
        image
            .platforms
            .iter()
            .map(|p| p.manifest_digest.as_str())
            .collect()
    } else {
        Default::default()
    };
    for (digest, blob) in &image.blobs {
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad digest {digest}"))
        })?;
        let name = if child_manifests.contains(digest.as_str()) {
            format!("{hex}.manifest.json")
        } else {
            hex.to_owned()
        };
        fs::write(dir.join(name), &blob.data)?;
    }
    fs::write(dir.join("manifest.json"), &image.manifest)
}

fn to_json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializing a serde_json::Value cannot fail")
}

struct Layer {
    compressed: Vec<u8>,
    diff_id: String,
}

/// Independent RNG for one (seed, platform, layer) triple.
fn layer_rng(seed: u64, platform: &str, index: usize) -> StdRng {
    let mut h = Sha256::new();
    h.update(b"shoal-imagegen/layer/v1\0");
    h.update(seed.to_le_bytes());
    h.update(platform.as_bytes());
    h.update(b"\0");
    h.update((index as u64).to_le_bytes());
    StdRng::from_seed(h.finalize().into())
}

/// A `Write` that hashes everything passing through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A `Read` yielding `remaining` pseudo-random bytes.
struct RngReader<'a> {
    rng: &'a mut StdRng,
    remaining: usize,
}

impl Read for RngReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.remaining);
        self.rng.fill_bytes(&mut buf[..n]);
        self.remaining -= n;
        Ok(n)
    }
}

fn tar_header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)?;
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_username("root")?;
    h.set_groupname("root")?;
    h.set_mtime(EPOCH);
    h.set_cksum();
    Ok(h)
}

/// Builds one layer: `shoal/<platform>/layer-<index>/` with a small text file and a few random
/// files adding up to about `size` bytes.
fn make_layer(seed: u64, platform: &str, index: usize, size: usize) -> Layer {
    build_layer(seed, platform, index, size).expect("writing a tar into memory cannot fail")
}

fn build_layer(seed: u64, platform: &str, index: usize, size: usize) -> io::Result<Layer> {
    let mut rng = layer_rng(seed, platform, index);
    // Random data does not compress: the fastest level keeps generation cheap while still
    // producing a regular deflate stream.
    let gz: GzEncoder<Vec<u8>> = GzBuilder::new().mtime(0).operating_system(255).write(
        Vec::with_capacity(size + size / 64 + 4096),
        Compression::fast(),
    );
    let mut builder = tar::Builder::new(HashingWriter {
        inner: gz,
        hasher: Sha256::new(),
    });
    builder.mode(tar::HeaderMode::Deterministic);

    let dir = format!("shoal/{}/layer-{index}", platform.replace('/', "-"));
    for d in [
        "shoal".to_owned(),
        format!("shoal/{}", platform.replace('/', "-")),
        dir.clone(),
    ] {
        let h = tar_header(&format!("{d}/"), 0, 0o755, tar::EntryType::Directory)?;
        builder.append(&h, io::empty())?;
    }

    let info =
        format!("shoal-imagegen seed={seed} platform={platform} layer={index} size={size}\n");
    let h = tar_header(
        &format!("{dir}/INFO"),
        info.len() as u64,
        0o644,
        tar::EntryType::Regular,
    )?;
    builder.append(&h, info.as_bytes())?;

    // 1 file up to 64 KiB, then up to 4 files: sizes split roughly evenly, determined by rng.
    let files = match size {
        0 => 0,
        1..=65_536 => 1,
        65_537..=1_048_576 => 2,
        _ => 4,
    };
    let mut left = size;
    for f in 0..files {
        let this = if f + 1 == files {
            left
        } else {
            let share = left / (files - f);
            // jitter each share by up to ±25% so files are not all the same size
            let jitter = (rng.next_u64() % (share as u64 / 2 + 1)) as usize;
            (share - share / 4 + jitter).min(left)
        };
        left -= this;
        let h = tar_header(
            &format!("{dir}/data-{f}.bin"),
            this as u64,
            0o644,
            tar::EntryType::Regular,
        )?;
        builder.append(
            &h,
            RngReader {
                rng: &mut rng,
                remaining: this,
            },
        )?;
    }

    let hw = builder.into_inner()?;
    let diff_id = format!("sha256:{}", hex::encode(hw.hasher.finalize()));
    let compressed = hw.inner.finish()?;
    Ok(Layer {
        compressed,
        diff_id,
    })
}

fn make_config(
    seed: u64,
    os: &str,
    architecture: &str,
    variant: Option<&str>,
    diff_ids: &[String],
) -> Vec<u8> {
    let history: Vec<Value> = (0..diff_ids.len())
        .map(|i| {
            json!({
                "created": EPOCH_RFC3339,
                "created_by": format!("shoal-imagegen layer {i}"),
            })
        })
        .collect();
    let mut config = json!({
        "architecture": architecture,
        "os": os,
        "created": EPOCH_RFC3339,
        "author": "shoal-imagegen",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
            "Labels": {
                "org.shoal.imagegen.seed": seed.to_string(),
            },
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": diff_ids,
        },
        "history": history,
    });
    if let Some(v) = variant {
        config["variant"] = json!(v);
    }
    to_json_bytes(&config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    fn spec(platforms: &[(&str, &str)], format: Format) -> ImageSpec {
        ImageSpec {
            seed: 42,
            layers: 3,
            layer_size: 100_000,
            platforms: platforms
                .iter()
                .map(|(o, a)| ((*o).to_owned(), (*a).to_owned()))
                .collect(),
            format,
            force_index: false,
        }
    }

    fn amd64() -> ImageSpec {
        spec(&[("linux", "amd64")], Format::Oci)
    }

    #[test]
    fn deterministic() {
        let a = generate(&amd64());
        let b = generate(&amd64());
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(a.manifest, b.manifest);
        assert_eq!(
            a.blobs.keys().collect::<Vec<_>>(),
            b.blobs.keys().collect::<Vec<_>>()
        );
        assert_eq!(a, b);

        let mut other = amd64();
        other.seed = 43;
        let c = generate(&other);
        assert_ne!(a.manifest_digest, c.manifest_digest);
        for d in &a.platforms[0].layer_digests {
            assert!(!c.blobs.contains_key(d), "layer {d} shared across seeds");
        }
    }

    #[test]
    fn digests_are_correct_and_well_formed() {
        for s in [
            amd64(),
            spec(&[("linux", "amd64"), ("linux", "arm64/v8")], Format::Docker),
        ] {
            let img = generate(&s);
            let well_formed = |d: &str| {
                d.len() == 71
                    && d.starts_with("sha256:")
                    && d[7..]
                        .chars()
                        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            };
            assert!(well_formed(&img.manifest_digest));
            assert_eq!(img.manifest_digest, sha256_digest(&img.manifest));
            for (digest, blob) in &img.blobs {
                assert!(well_formed(digest));
                assert_eq!(digest, &sha256_digest(&blob.data));
            }
            let expected = s.layers * s.platforms.len() // layers
                + s.platforms.len() // configs
                + if s.is_index() { s.platforms.len() } else { 0 }; // child manifests
            assert_eq!(img.blobs.len(), expected);
        }
    }

    #[test]
    fn manifest_references_blobs_with_right_sizes() {
        let img = generate(&amd64());
        assert_eq!(img.media_type, OCI_MANIFEST);
        let m: Value = serde_json::from_slice(&img.manifest).unwrap();
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(m["mediaType"], OCI_MANIFEST);
        let mut descs = vec![m["config"].clone()];
        descs.extend(m["layers"].as_array().unwrap().iter().cloned());
        assert_eq!(descs.len(), 4);
        for d in descs {
            let blob = &img.blobs[d["digest"].as_str().unwrap()];
            assert_eq!(d["size"].as_u64().unwrap(), blob.data.len() as u64);
            assert_eq!(d["mediaType"].as_str().unwrap(), blob.media_type);
        }
    }

    #[test]
    fn layer_is_readable_tar_gz_matching_diff_id() {
        let s = amd64();
        let img = generate(&s);
        let plat = &img.platforms[0];
        let config: Value = serde_json::from_slice(&img.blobs[&plat.config_digest].data).unwrap();
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["config"]["Cmd"][0], "/bin/sh");
        let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(diff_ids, plat.diff_ids);
        assert_eq!(plat.layer_digests.len(), s.layers);

        for (digest, diff_id) in plat.layer_digests.iter().zip(&plat.diff_ids) {
            let blob = &img.blobs[digest];
            assert_eq!(blob.media_type, OCI_LAYER_GZIP);
            let mut tar_bytes = Vec::new();
            GzDecoder::new(blob.data.as_slice())
                .read_to_end(&mut tar_bytes)
                .unwrap();
            assert_eq!(&sha256_digest(&tar_bytes), diff_id);

            let mut archive = tar::Archive::new(tar_bytes.as_slice());
            let mut payload = 0usize;
            let mut files = 0;
            for entry in archive.entries().unwrap() {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().into_owned();
                assert!(path.starts_with("shoal"), "{path:?}");
                if entry.header().entry_type() == tar::EntryType::Regular {
                    let mut buf = Vec::new();
                    entry.read_to_end(&mut buf).unwrap();
                    assert_eq!(buf.len() as u64, entry.header().size().unwrap());
                    if path.extension().is_some_and(|e| e == "bin") {
                        payload += buf.len();
                        files += 1;
                    }
                }
            }
            assert_eq!(payload, s.layer_size);
            assert!(files >= 2, "expected a few files, got {files}");
        }
    }

    #[test]
    fn index_lists_each_platform_with_distinct_layers() {
        for format in [Format::Oci, Format::Docker] {
            let s = spec(
                &[
                    ("linux", "amd64"),
                    ("linux", "arm64/v8"),
                    ("linux", "s390x"),
                ],
                format,
            );
            let img = generate(&s);
            assert!(img.is_index());
            assert_eq!(img.media_type, format.index_media_type());
            let idx: Value = serde_json::from_slice(&img.manifest).unwrap();
            assert_eq!(idx["mediaType"], format.index_media_type());
            let entries = idx["manifests"].as_array().unwrap();
            assert_eq!(entries.len(), 3);
            let plats: Vec<String> = entries
                .iter()
                .map(|e| {
                    let p = &e["platform"];
                    let mut s = format!(
                        "{}/{}",
                        p["os"].as_str().unwrap(),
                        p["architecture"].as_str().unwrap()
                    );
                    if let Some(v) = p.get("variant").and_then(Value::as_str) {
                        s = format!("{s}/{v}");
                    }
                    s
                })
                .collect();
            assert_eq!(plats, ["linux/amd64", "linux/arm64/v8", "linux/s390x"]);
            for (e, plat) in entries.iter().zip(&img.platforms) {
                let digest = e["digest"].as_str().unwrap();
                assert_eq!(digest, plat.manifest_digest);
                let child = &img.blobs[digest];
                assert_eq!(child.media_type, format.manifest_media_type());
                assert_eq!(e["size"].as_u64().unwrap(), child.data.len() as u64);
                let m: Value = serde_json::from_slice(&child.data).unwrap();
                assert_eq!(m["config"]["digest"], plat.config_digest.as_str());
                let config: Value =
                    serde_json::from_slice(&img.blobs[&plat.config_digest].data).unwrap();
                assert_eq!(config["architecture"], plat.architecture.as_str());
            }
            let mut all_layers: Vec<&String> = img
                .platforms
                .iter()
                .flat_map(|p| &p.layer_digests)
                .collect();
            let n = all_layers.len();
            all_layers.sort();
            all_layers.dedup();
            assert_eq!(all_layers.len(), n, "layers must differ across platforms");
        }
    }

    #[test]
    fn force_index_and_docker_single() {
        let mut s = amd64();
        s.format = Format::Docker;
        let img = generate(&s);
        assert_eq!(img.media_type, DOCKER_MANIFEST);
        let m: Value = serde_json::from_slice(&img.manifest).unwrap();
        assert_eq!(m["config"]["mediaType"], DOCKER_CONFIG);
        assert_eq!(m["layers"][0]["mediaType"], DOCKER_LAYER_GZIP);

        s.force_index = true;
        let img = generate(&s);
        assert_eq!(img.media_type, DOCKER_MANIFEST_LIST);
        assert_eq!(img.platforms.len(), 1);
    }

    #[test]
    fn tiny_and_empty_layers() {
        let mut s = amd64();
        s.layer_size = 0;
        s.layers = 2;
        let img = generate(&s);
        assert_eq!(img.platforms[0].layer_digests.len(), 2);
        // Distinct even when empty: the INFO file names the layer index.
        assert_ne!(
            img.platforms[0].layer_digests[0],
            img.platforms[0].layer_digests[1]
        );
        s.layer_size = 7;
        generate(&s);
    }

    #[test]
    fn oci_layout_is_valid_and_merges_tags() {
        let dir = tempfile::tempdir().unwrap();
        let single = generate(&amd64());
        let multi = generate(&spec(
            &[("linux", "amd64"), ("linux", "arm64")],
            Format::Oci,
        ));
        write_oci_layout(&single, dir.path(), "one").unwrap();
        write_oci_layout(&multi, dir.path(), "two").unwrap();
        write_oci_layout(&multi, dir.path(), "two").unwrap(); // idempotent

        let layout: Value =
            serde_json::from_slice(&fs::read(dir.path().join("oci-layout")).unwrap()).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: Value =
            serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        let entries = index["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        for (e, img, tag) in [(&entries[0], &single, "one"), (&entries[1], &multi, "two")] {
            assert_eq!(e["digest"], img.manifest_digest.as_str());
            assert_eq!(e["mediaType"], img.media_type.as_str());
            assert_eq!(e["size"].as_u64().unwrap(), img.manifest.len() as u64);
            assert_eq!(e["annotations"][REF_NAME_ANNOTATION], tag);
        }
        for img in [&single, &multi] {
            for digest in img.blobs.keys().chain([&img.manifest_digest]) {
                let path = dir
                    .path()
                    .join("blobs/sha256")
                    .join(digest.strip_prefix("sha256:").unwrap());
                let data = fs::read(&path).unwrap();
                assert_eq!(&sha256_digest(&data), digest);
                assert_eq!(img.get(digest).unwrap().1, data.as_slice());
            }
        }
        // Retagging "one" to the multi-arch image replaces the entry rather than duplicating it.
        write_oci_layout(&multi, dir.path(), "one").unwrap();
        let index: Value =
            serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        let entries = index["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries
            .iter()
            .all(|e| e["digest"] == multi.manifest_digest.as_str()));
    }

    #[test]
    fn dir_layout_has_all_objects() {
        let dir = tempfile::tempdir().unwrap();
        let img = generate(&spec(
            &[("linux", "amd64"), ("linux", "arm64")],
            Format::Docker,
        ));
        write_dir_layout(&img, dir.path()).unwrap();
        assert_eq!(
            fs::read(dir.path().join("manifest.json")).unwrap(),
            img.manifest
        );
        assert!(fs::read_to_string(dir.path().join("version"))
            .unwrap()
            .starts_with("Directory Transport Version: 1.1"));
        for p in &img.platforms {
            let hex = p.manifest_digest.strip_prefix("sha256:").unwrap();
            let data = fs::read(dir.path().join(format!("{hex}.manifest.json"))).unwrap();
            assert_eq!(sha256_digest(&data), p.manifest_digest);
            for d in p.layer_digests.iter().chain([&p.config_digest]) {
                let data = fs::read(dir.path().join(d.strip_prefix("sha256:").unwrap())).unwrap();
                assert_eq!(&sha256_digest(&data), d);
            }
        }
        // version + manifest.json + every blob
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            2 + img.blobs.len()
        );
    }

    #[test]
    fn parse_helpers() {
        assert_eq!(
            parse_platform("linux/amd64").unwrap(),
            ("linux".to_owned(), "amd64".to_owned())
        );
        assert_eq!(
            parse_platform("linux/arm/v7").unwrap(),
            ("linux".to_owned(), "arm/v7".to_owned())
        );
        for bad in ["linux", "", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(parse_platform(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!("OCI".parse::<Format>().unwrap(), Format::Oci);
        assert_eq!("docker".parse::<Format>().unwrap(), Format::Docker);
        assert!("zip".parse::<Format>().is_err());
    }

    #[test]
    fn total_bytes_counts_everything() {
        let img = generate(&amd64());
        let sum: u64 = img.blobs.values().map(|b| b.data.len() as u64).sum::<u64>()
            + img.manifest.len() as u64;
        assert_eq!(img.total_bytes(), sum);
        assert!(img.total_bytes() > 300_000);
    }
}
