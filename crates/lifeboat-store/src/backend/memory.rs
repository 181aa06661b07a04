//! A vault in memory, for tests and `memory://` locations.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use super::{BResult, Backend, BackendError, ObjectInfo};

#[derive(Debug, Default)]
pub struct MemoryBackend {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn not_found(&self, key: &str) -> BackendError {
        BackendError::NotFound {
            location: self.location(),
            key: key.to_string(),
        }
    }
}

impl Backend for MemoryBackend {
    fn location(&self) -> String {
        "memory://".into()
    }

    fn put(&self, key: &str, data: &[u8]) -> BResult<()> {
        self.objects
            .lock()
            .unwrap()
            .insert(key.to_string(), data.to_vec());
        Ok(())
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> BResult<()> {
        let mut m = self.objects.lock().unwrap();
        if m.contains_key(key) {
            return Err(BackendError::AlreadyExists {
                location: self.location(),
                key: key.to_string(),
            });
        }
        m.insert(key.to_string(), data.to_vec());
        Ok(())
    }

    fn get(&self, key: &str) -> BResult<Vec<u8>> {
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| self.not_found(key))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Vec<u8>> {
        let m = self.objects.lock().unwrap();
        let v = m.get(key).ok_or_else(|| self.not_found(key))?;
        let (s, e) = (range.start as usize, range.end as usize);
        if s > e || e > v.len() {
            return Err(BackendError::Io {
                location: self.location(),
                op: "get",
                key: key.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "range past end"),
            });
        }
        Ok(v[s..e].to_vec())
    }

    fn head(&self, key: &str) -> BResult<Option<u64>> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .get(key)
            .map(|v| v.len() as u64))
    }

    fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    fn delete(&self, key: &str) -> BResult<()> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_backend_passes_the_suite() {
        crate::backend::suite::run(&super::MemoryBackend::new());
    }
}
