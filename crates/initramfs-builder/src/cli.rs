//! The `cloude-image` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::catalog::Catalog;
use crate::image::block::{self, RootCompression};
use crate::image::{self, BuildOptions, Compression, Format};
use crate::kernel::{self, Flavor};
use crate::progress::Progress;

#[derive(Parser, Debug)]
#[command(
    name = "cloude-image",
    version,
    about = "Builds Cloude's guest kernel and language images"
)]
struct Cli {
    /// Hide progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Language catalogue file (default: the embedded one).
    #[arg(long, global = true, env = crate::catalog::CATALOG_ENV)]
    catalog: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the guest kernel if needed; print the path of its bzImage as the last line.
    Kernel {
        /// Build the KVM lab's kernel (guest config + KVM host) instead.
        #[arg(long)]
        lab: bool,
        /// Print the uncompressed ELF `vmlinux` instead of the bzImage.
        #[arg(long)]
        vmlinux: bool,
    },
    /// Build a language image if needed; print its path as the last line.
    Build {
        /// Language names or aliases from the catalogue.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        language: Vec<String>,
        /// Build every language of the catalogue (one path per line).
        #[arg(long, conflicts_with_all = ["from", "output"])]
        all: bool,
        /// Build from this OCI image instead (docker://HOST/REPO:TAG, oci:DIR[:TAG],
        /// docker-archive:FILE).
        #[arg(long)]
        from: Option<String>,
        /// Allow a plain-HTTP registry on loopback.
        #[arg(long)]
        insecure: bool,
        /// Also copy the image to this path.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// The agent binary to inject as /init (default: $CLOUDE_AGENT_BIN or the sibling
        /// cloude-agent).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// gzip, lz4, zstd or none (default: $CLOUDE_IMAGE_COMPRESSION or lz4).
        #[arg(long)]
        compression: Option<Compression>,
        /// `initramfs`: one compressed cpio the kernel unpacks into RAM (prints its path).
        /// `block`: the root as a read-only EROFS image for virtio-blk plus a small initramfs
        /// holding only the agent (prints the initramfs, then the root, one per line).
        #[arg(long, default_value = "initramfs")]
        format: Format,
        /// EROFS data of a block root: none or lz4hc.
        #[arg(long, default_value = "none")]
        root_compression: RootCompression,
        /// Lower the cap on an OCI image's tar entries, whiteouts included (default and maximum
        /// 4,000,000).
        #[arg(long, value_name = "N")]
        max_entries: Option<u64>,
        /// Lower the cap on an OCI image's uncompressed layer bytes, all layers together
        /// (default and maximum 8 GiB).
        #[arg(long, value_name = "BYTES")]
        max_uncompressed_bytes: Option<u64>,
    },
    /// List the catalogue's languages.
    List,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let progress = Progress::new(cli.quiet);
    match run(cli.cmd, cli.catalog, &progress) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloude-image: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd, catalog: Option<PathBuf>, progress: &Progress) -> anyhow::Result<()> {
    match cmd {
        Cmd::Kernel { lab, vmlinux } => {
            let flavor = if lab { Flavor::Lab } else { Flavor::Guest };
            let k = kernel::ensure_kernel(flavor, progress)?;
            let p = if vmlinux { k.vmlinux } else { k.bzimage };
            println!("{}", p.display());
        }
        Cmd::Build {
            language,
            all,
            from,
            insecure,
            output,
            agent,
            compression,
            format,
            root_compression,
            max_entries,
            max_uncompressed_bytes,
        } => {
            let cat = Catalog::load(catalog.as_deref())?;
            let langs: Vec<_> = if all {
                cat.languages.iter().collect()
            } else {
                language
                    .iter()
                    .map(|language| {
                        cat.find(language, None).ok_or_else(|| {
                            anyhow::anyhow!(
                                "language {language:?} is not in the catalogue (see `cloude-image list`)"
                            )
                        })
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            let defaults = image::tree::Limits::default();
            let limits = defaults.lowered(image::tree::Limits {
                max_entries: max_entries.unwrap_or(defaults.max_entries),
                max_stream_bytes: max_uncompressed_bytes.unwrap_or(defaults.max_stream_bytes),
                ..defaults
            });
            let opts = BuildOptions {
                from,
                insecure,
                output,
                agent,
                limits,
            };
            let compression = match compression {
                Some(c) => c,
                None => image::default_compression()?,
            };
            for lang in langs {
                match format {
                    Format::Initramfs => {
                        let p = image::ensure_image_with(lang, &opts, compression, progress)?;
                        println!("{}", p.display());
                    }
                    Format::Block => {
                        let b = block::ensure_block_image(lang, &opts, root_compression, progress)?;
                        println!("{}", b.boot.display());
                        println!("{}", b.root.display());
                    }
                }
            }
        }
        Cmd::List => {
            let cat = Catalog::load_resolved(catalog.as_deref())?;
            for l in &cat.languages {
                let source = match &l.image {
                    Some(i) => i.clone(),
                    None => format!("debian: {}", l.all_debian_packages().join(" ")),
                };
                let aliases = if l.aliases.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", l.aliases.join(", "))
                };
                println!("{:<12} {:<10} {}{}", l.name, l.version, source, aliases);
            }
        }
    }
    Ok(())
}
