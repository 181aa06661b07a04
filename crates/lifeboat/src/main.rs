//! `lifeboat`: the command-line interface. Thin: parsing, output and
//! progress here; the work is in the library crates.

mod cmd;
mod common;
mod sample;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lifeboat",
    version,
    about = "Open-source site recovery for Linux: protect block volumes, keep recovery points, copy big images",
    long_about = "Lifeboat protects block volumes (disk images, block devices, VM disks): an agent on \
the primary site serves them (NBD or a FUSE file) and replicates every write over mutual TLS to a \
server on the recovery site, which keeps hot replicas and cuts recovery points; points go into an \
encrypted, deduplicated vault on local disk or object storage (S3, Azure Blob, GCS), also by \
scanning volumes directly, and restore from there. It also copies big sparse images with honest \
progress.\n\n\
The vault password comes from LIFEBOAT_PASSWORD or --password-file (never from the command line), \
or use --key-file.",
    after_help = "Examples:\n  lifeboat demo\n  LIFEBOAT_PASSWORD=s3cret lifeboat vault init /srv/vault\n  \
LIFEBOAT_PASSWORD=s3cret lifeboat point create /srv/vault --volume disk0=/var/lib/images/vm.raw\n  \
lifeboat copy vm.raw az://images/vm.raw --verify\n\n\
Two sites (recovery site first, then the primary):\n  \
lifeboat server init /srv/lifeboat --vault /srv/vault --site dr1\n  \
LIFEBOAT_PASSWORD=s3cret lifeboat server run /srv/lifeboat\n  \
lifeboat server token create /srv/lifeboat --site primary > token\n  \
lifeboat agent enroll --server dr1:7443 --token-file token --config /etc/lifeboat/agent.toml\n  \
lifeboat agent run\n  \
lifeboat protect db --volume disk0=/srv/db.img --nbd-socket /run/lifeboat/db.sock\n  \
lifeboat status"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create, check and prune vaults
    #[command(subcommand)]
    Vault(cmd::vault::VaultCmd),
    /// Take, list, compare and restore recovery points
    #[command(subcommand)]
    Point(cmd::point::PointCmd),
    /// Copy a big (sparse) image between files, devices and object stores
    Copy(cmd::copy::CopyArgs),
    /// Run the whole cycle on a sample volume in a temporary directory
    Demo(cmd::demo::DemoArgs),
    /// Export a volume over NBD
    #[command(subcommand)]
    Nbd(cmd::nbd::NbdCmd),
    /// The recovery site: receive replication, keep hot replicas, cut points, serve the API
    #[command(
        subcommand,
        after_help = "Example:\n  lifeboat server init /srv/lifeboat --vault /srv/vault --site dr1\n  \
LIFEBOAT_PASSWORD=s3cret lifeboat server run /srv/lifeboat\n  \
lifeboat server token create /srv/lifeboat --site primary > token"
    )]
    Server(cmd::server::ServerCmd),
    /// The primary site: serve protected volumes and replicate every write
    #[command(
        subcommand,
        after_help = "Example:\n  lifeboat agent enroll --server dr1:7443 --token-file token --config /etc/lifeboat/agent.toml\n  \
lifeboat protect db --volume disk0=/srv/db.img --fuse-mount /run/lifeboat/db\n  \
lifeboat agent run --config /etc/lifeboat/agent.toml"
    )]
    Agent(cmd::agent::AgentCmd),
    /// Protect a volume with a (running) agent
    #[command(
        after_help = "Example:\n  lifeboat protect db --volume disk0=/srv/db.img --nbd-socket /run/lifeboat/db.sock --config /etc/lifeboat/agent.toml"
    )]
    Protect(cmd::agent::ProtectArgs),
    /// Stop protecting an item (or one of its volumes)
    #[command(after_help = "Example:\n  lifeboat unprotect db --config /etc/lifeboat/agent.toml")]
    Unprotect(cmd::agent::UnprotectArgs),
    /// Pause replication of an item (the volumes stay served and journaled)
    #[command(after_help = "Example:\n  lifeboat pause db --config /etc/lifeboat/agent.toml")]
    Pause(cmd::agent::PauseArgs),
    /// Resume replication of a paused item
    #[command(after_help = "Example:\n  lifeboat resume db --config /etc/lifeboat/agent.toml")]
    Resume(cmd::agent::PauseArgs),
    /// Replication health: state, RPO, lag, throughput, last point per volume
    #[command(after_help = "Example:\n  lifeboat status --api 127.0.0.1:7480 --json")]
    Status(cmd::status::StatusArgs),
    /// Tools for tests and benchmarks (sample images)
    #[command(subcommand, hide = true)]
    Debug(cmd::debug::DebugCmd),
}

/// Keep big buffers (packs, restore spans) on the heap instead of mapping
/// and unmapping them for each use: every munmap in a threaded process
/// shoots down TLBs on the other cores, which costs more than the copy.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    // the long-running services log their progress; one-shot commands only warn
    let default_filter = match cli.cmd {
        Cmd::Server(cmd::server::ServerCmd::Run(_))
        | Cmd::Agent(cmd::agent::AgentCmd::Run { .. }) => {
            "warn,lifeboat_server=info,lifeboat_replicate=info"
        }
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let res = match cli.cmd {
        Cmd::Vault(c) => cmd::vault::run(c),
        Cmd::Point(c) => cmd::point::run(c),
        Cmd::Copy(a) => cmd::copy::run(a),
        Cmd::Demo(a) => cmd::demo::run(a),
        Cmd::Nbd(c) => cmd::nbd::run(c),
        Cmd::Server(c) => cmd::server::run(c),
        Cmd::Agent(c) => cmd::agent::run(c),
        Cmd::Protect(a) => cmd::agent::protect(a),
        Cmd::Unprotect(a) => cmd::agent::unprotect(a),
        Cmd::Pause(a) => cmd::agent::pause(a, true),
        Cmd::Resume(a) => cmd::agent::pause(a, false),
        Cmd::Status(a) => cmd::status::run(a),
        Cmd::Debug(c) => cmd::debug::run(c),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
