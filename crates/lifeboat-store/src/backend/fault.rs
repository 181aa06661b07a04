//! Fault injection around any backend, for tests of "bad input loses
//! nothing": fail writes after a budget, or fail every operation (a dead peer).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use super::{BResult, Backend, BackendError, DynBackend, ObjectInfo};

pub struct FaultBackend {
    inner: DynBackend,
    /// Puts left before puts start failing (negative: unlimited).
    puts_left: AtomicI64,
    dead: AtomicBool,
}

impl FaultBackend {
    pub fn new(inner: DynBackend) -> Self {
        FaultBackend {
            inner,
            puts_left: AtomicI64::new(-1),
            dead: AtomicBool::new(false),
        }
    }

    /// Let `n` more puts succeed, then fail every put as a full disk would.
    pub fn fail_puts_after(&self, n: i64) {
        self.puts_left.store(n, Ordering::SeqCst);
    }

    /// Fail every operation as an unreachable peer would.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }

    fn check(&self, op: &'static str, key: &str) -> BResult<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(BackendError::Remote {
                location: self.location(),
                op,
                key: key.into(),
                message: "connection refused (injected)".into(),
            });
        }
        Ok(())
    }

    fn check_put(&self, key: &str) -> BResult<()> {
        self.check("put", key)?;
        let left = self.puts_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(BackendError::Io {
                location: self.location(),
                op: "put",
                key: key.into(),
                source: std::io::Error::from_raw_os_error(libc_enospc()),
            });
        }
        if left > 0 {
            self.puts_left.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}

impl Backend for FaultBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, key: &str, data: &[u8]) -> BResult<()> {
        self.check_put(key)?;
        self.inner.put(key, data)
    }
    fn put_if_absent(&self, key: &str, data: &[u8]) -> BResult<()> {
        self.check_put(key)?;
        self.inner.put_if_absent(key, data)
    }
    fn get(&self, key: &str) -> BResult<Vec<u8>> {
        self.check("get", key)?;
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Vec<u8>> {
        self.check("get", key)?;
        self.inner.get_range(key, range)
    }
    fn head(&self, key: &str) -> BResult<Option<u64>> {
        self.check("head", key)?;
        self.inner.head(key)
    }
    fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>> {
        self.check("list", prefix)?;
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> BResult<()> {
        self.check("delete", key)?;
        self.inner.delete(key)
    }
}
