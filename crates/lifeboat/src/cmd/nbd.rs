//! `lifeboat nbd serve`: export a volume over NBD (the splitter's front end).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lifeboat_capture::extents::volume_size;
use lifeboat_capture::nbd::{serve_listener, Export};

#[derive(Subcommand)]
pub enum NbdCmd {
    /// Serve a raw image or block device to NBD clients (qemu, nbdcopy, nbdinfo, nbdfuse)
    #[command(
        after_help = "Structured replies, base:allocation block status (holes), READ, WRITE, FLUSH, FUA, \
TRIM, WRITE_ZEROES, CACHE. With --journal, every write is appended to a local journal in order before it is acknowledged (the \
splitter's capture; shipping it to a recovery site comes with `lifeboat agent`). Serves until interrupted.\n\n\
Examples:\n  lifeboat nbd serve vm.raw --socket /run/lifeboat/vm.sock\n  \
qemu-img info 'nbd+unix:///disk0?socket=/run/lifeboat/vm.sock'\n  \
lifeboat nbd serve /dev/vg0/db --listen 127.0.0.1:10809 --name db --read-only"
    )]
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Raw image file or block device
    pub volume: PathBuf,
    /// Export name
    #[arg(long, default_value = "disk0")]
    pub name: String,
    /// Unix socket to listen on
    #[arg(long, conflicts_with = "listen")]
    pub socket: Option<PathBuf>,
    /// TCP address to listen on, e.g. 127.0.0.1:10809
    #[arg(long)]
    pub listen: Option<String>,
    /// Refuse writes
    #[arg(long)]
    pub read_only: bool,
    /// Capture every write, in order, into a journal in this directory
    /// before acknowledging it (FLUSH/FUA become durable barriers), and keep
    /// a dirty map of the chunks written (DIR/dirty.map)
    #[arg(long, value_name = "DIR")]
    pub journal: Option<PathBuf>,
}

pub fn run(c: NbdCmd) -> Result<()> {
    let NbdCmd::Serve(a) = c;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!a.read_only)
        .open(&a.volume)
        .with_context(|| format!("cannot open {}", a.volume.display()))?;
    let size = volume_size(&file)?;
    let journal = match &a.journal {
        Some(d) => Some(
            lifeboat_capture::journal::Journal::open(d)
                .map(Arc::new)
                .with_context(|| format!("cannot open the journal in {}", d.display()))?,
        ),
        None => None,
    };
    // The dirty map lives beside the journal, one bit per 64 KiB chunk.
    let dirty = match &a.journal {
        Some(d) => Some(
            lifeboat_capture::dirtymap::DirtyMap::open(&d.join("dirty.map"), 64 << 10, size)
                .map(Arc::new)
                .with_context(|| format!("cannot open the dirty map in {}", d.display()))?,
        ),
        None => None,
    };
    let export = Arc::new(Export::new(
        &a.name,
        file,
        size,
        a.read_only,
        journal,
        dirty,
    ));
    let shutdown = Arc::new(AtomicBool::new(false));
    match (&a.socket, &a.listen) {
        (Some(path), None) => {
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            eprintln!(
                "serving {} ({} bytes) at nbd+unix:///{}?socket={}",
                a.volume.display(),
                size,
                a.name,
                path.display()
            );
            serve_listener(move || l.accept().map(|(s, _)| s), export, shutdown);
        }
        (None, Some(addr)) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr}"))?;
            let local = l.local_addr()?;
            eprintln!(
                "serving {} ({} bytes) at nbd://{local}/{}",
                a.volume.display(),
                size,
                a.name
            );
            serve_listener(
                move || {
                    l.accept().map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        s
                    })
                },
                export,
                shutdown,
            );
        }
        _ => bail!("give --socket PATH or --listen ADDR"),
    }
    Ok(())
}
