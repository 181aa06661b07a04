//! The NBD export with the clients users put on it beyond qemu-img/qemu-io:
//! a qemu VM whose virtio disk is the export (Debian's kernel, a busybox
//! initramfs, ext4 made and written inside the guest), and nbdfuse. Both
//! replicate to a server on loopback; the replica and a point restored from
//! the vault are checked.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Equal bytes, or a panic naming the first offset that differs.
fn same(a: &[u8], b: &[u8], what: &str) {
    if a != b {
        let at = a.iter().zip(b).position(|(x, y)| x != y);
        panic!(
            "{what}: lengths {} and {}, first difference at {at:?}",
            a.len(),
            b.len()
        );
    }
}

fn tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools")
}

/// The kernel, its modules and the unpacked qemu-system-x86 that
/// scripts/setup-test-deps keeps in .tools.
fn vm_ready() -> bool {
    let t = tools();
    let ok = t.join("vm/vmlinuz").exists()
        && t.join("vm/ext4.ko").exists()
        && t.join("qemu/usr/bin/qemu-system-x86_64").exists()
        && Path::new("/bin/busybox").exists()
        && have("cpio")
        && have("e2fsck")
        && have("debugfs");
    if !ok {
        assert!(
            std::env::var("LIFEBOAT_REQUIRE_EMULATORS").is_err(),
            "the qemu VM test needs .tools/vm and .tools/qemu (scripts/setup-test-deps)"
        );
        eprintln!("skipped: no VM kernel or qemu-system-x86 in .tools");
    }
    ok
}

const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
];

/// An initramfs whose /init loads the virtio and ext4 modules, runs `work`
/// and powers the VM off.
fn initramfs(dir: &Path, work: &str) -> PathBuf {
    let root = dir.join("initramfs");
    for d in ["bin", "lib", "proc", "sys", "dev", "mnt"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for m in MODULES {
        std::fs::copy(
            tools().join(format!("vm/{m}.ko")),
            root.join(format!("lib/{m}.ko")),
        )
        .unwrap();
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         for m in {}; do insmod /lib/$m.ko || echo \"GUEST-FAIL insmod $m\"; done\n\
         {work}\n\
         sync\n\
         poweroff -f\n",
        MODULES.join(" ")
    );
    let p = root.join("init");
    std::fs::write(&p, init).unwrap();
    ok(Command::new("chmod").arg("+x").arg(&p).output().unwrap());
    let out = dir.join("initrd.img");
    ok(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            root.display(),
            out.display()
        ))
        .output()
        .unwrap());
    out
}

#[test]
fn a_qemu_vm_makes_and_writes_ext4_on_the_replicated_nbd_export() {
    if !have("qemu-io") || !vm_ready() {
        return;
    }
    let Some((d, s)) = Sites::ready("8GiB") else {
        return;
    };
    // Inside the guest: the disk is discarded (NBD TRIM), an ext2 file
    // system made (busybox's mke2fs) and mounted by the ext4 driver; 8 MiB of
    // random data and its digest go into files; fstrim trims the free
    // blocks; the unmount and sync flush (NBD FLUSH).
    let work = "blkdiscard /dev/vda && mke2fs -q /dev/vda && mount -t ext2 /dev/vda /mnt && \
                dd if=/dev/urandom of=/mnt/data bs=1M count=8 2>/dev/null && \
                mkdir /mnt/etc && echo 'hello from the guest' > /mnt/etc/motd && \
                md5sum /mnt/data > /mnt/sum && cat /mnt/sum && fstrim /mnt && umount /mnt && sync && \
                echo GUEST-OK || echo GUEST-FAIL";
    let initrd = initramfs(d.path(), work);
    let q = tools().join("qemu/usr");
    let out = Command::new(q.join("bin/qemu-system-x86_64"))
        .env("QEMU_MODULE_DIR", q.join("lib/x86_64-linux-gnu/qemu"))
        .arg("-L")
        .arg(q.join("share/qemu"))
        .arg("-L")
        .arg(q.join("share/seabios"))
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(tools().join("vm/vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,discard=unmap",
            s.uri()
        ))
        .output()
        .unwrap();
    let console =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{console}");
    assert!(
        console.contains("GUEST-OK") && !console.contains("GUEST-FAIL"),
        "{console}"
    );
    assert!(!console.contains("I/O error"), "{console}");
    let sum = console
        .lines()
        .find(|l| l.ends_with("/mnt/data"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    // the hot replica converges byte-identical to the volume the VM wrote
    let st = s.converge();
    assert_eq!(st["consistent"], true, "{st}");
    // a point cut now restores to a file system that checks clean and holds
    // the guest's files
    let (code, cut) = s.cut();
    assert_eq!(code, 200, "{cut}");
    let id = cut["id"].as_str().unwrap().to_string();
    ok(lb(
        d.path(),
        &[
            "point", "restore", "vault", &id, "--volume", "disk0", "--to", "vm.img",
        ],
    ));
    let img = d.path().join("vm.img");
    ok(Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap());
    let motd = ok(Command::new("debugfs")
        .arg("-R")
        .arg("cat /etc/motd")
        .arg(&img)
        .output()
        .unwrap());
    assert_eq!(motd.trim(), "hello from the guest");
    ok(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /data {}", d.path().join("data").display()))
        .arg(&img)
        .output()
        .unwrap());
    let md5 = ok(Command::new("md5sum")
        .arg(d.path().join("data"))
        .output()
        .unwrap());
    assert_eq!(md5.split_whitespace().next().unwrap(), sum);
}

#[test]
fn nbdfuse_mounts_the_export_and_its_writes_replicate() {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0 && Path::new("/dev/fuse").exists();
    if !root {
        assert!(
            std::env::var("LIFEBOAT_REQUIRE_EMULATORS").is_err(),
            "the nbdfuse test needs root and /dev/fuse"
        );
        eprintln!("skipped: nbdfuse needs root and /dev/fuse");
        return;
    }
    // as root, nbdfuse mounts and umount unmounts without fusermount3 (the
    // fuse3 package would replace Debian's fuse, which other tools need)
    if !have("nbdfuse") || !have("umount") {
        return;
    }
    let Some((d, s)) = Sites::ready("8GiB") else {
        return;
    };
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let file = mnt.join("disk");
    let guard = Mounted(mnt.clone());
    let mut fuse = Command::new("nbdfuse")
        .arg(&file)
        .arg("--unix")
        .arg(&s.sock)
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !std::fs::metadata(&file).is_ok_and(|m| m.len() == 64 << 20) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "nbdfuse did not mount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sh = |c: &str| {
        ok(Command::new("sh")
            .arg("-c")
            .arg(c)
            .current_dir(d.path())
            .output()
            .unwrap())
    };
    // writes at scattered offsets, then read back through the mount
    sh("head -c 3M /dev/urandom > pat && \
        dd if=pat of=mnt/disk bs=1M seek=5 conv=notrunc,fsync status=none && \
        dd if=pat of=mnt/disk bs=4k count=3 seek=16381 conv=notrunc,fsync status=none && \
        dd if=/dev/zero of=mnt/disk bs=64k count=4 seek=200 conv=notrunc,fsync status=none");
    let via = std::fs::read(&file).unwrap();
    let src = std::fs::read(&s.src).unwrap();
    same(&via, &src, "read through nbdfuse vs the volume");
    let pat = std::fs::read(d.path().join("pat")).unwrap();
    same(&src[5 << 20..8 << 20], &pat, "1 MiB writes");
    same(
        &src[(16381 << 12)..(16381 << 12) + (12 << 10)],
        &pat[..12 << 10],
        "4 KiB writes at the end",
    );
    same(&src[200 << 16..204 << 16], &[0u8; 256 << 10], "zeros");
    ok(Command::new("umount").arg(&mnt).output().unwrap());
    let _ = fuse.wait();
    drop(guard);
    let st = s.converge();
    assert_eq!(st["consistent"], true, "{st}");
}
