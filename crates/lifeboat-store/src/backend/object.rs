//! Object storage through the `object_store` crate: S3 (and S3-compatible
//! stores: MinIO, Ceph, moto), Azure Blob (and Azurite), Google Cloud Storage.
//!
//! Configuration comes from the usual environment variables of each cloud
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, …;
//! `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! `AZURE_STORAGE_USE_EMULATOR`, …; `GOOGLE_SERVICE_ACCOUNT`, …), never from
//! the command line, so secrets stay out of argv and logs.

use std::ops::Range;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::{BResult, Backend, BackendError, ObjectInfo};

/// Parsed object URL: scheme, bucket/container and key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    pub scheme: String,
    pub bucket: String,
    pub prefix: String,
}

impl ObjectUrl {
    /// Parse `s3://bucket/prefix`, `az://container/prefix`, `gs://bucket/prefix`.
    ///
    /// # Errors
    /// Another scheme or a missing bucket.
    pub fn parse(url: &str) -> BResult<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| BackendError::Config(format!("{url}: not a URL")))?;
        let scheme = match scheme {
            "s3" | "s3a" => "s3",
            "az" | "azure" | "abfs" => "az",
            "gs" => "gs",
            s => {
                return Err(BackendError::Config(format!(
                    "{url}: unknown object-store scheme {s:?}; use s3://, az:// or gs://"
                )))
            }
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(BackendError::Config(format!(
                "{url}: no bucket or container"
            )));
        }
        Ok(ObjectUrl {
            scheme: scheme.into(),
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
        })
    }

    pub fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("{}://{}", self.scheme, self.bucket)
        } else {
            format!("{}://{}/{}", self.scheme, self.bucket, self.prefix)
        }
    }
}

/// Build the `object_store` client for a parsed URL from the environment.
///
/// # Errors
/// Configuration the client rejects (missing credentials, bad endpoint).
pub fn build_store(u: &ObjectUrl) -> BResult<Arc<dyn ObjectStore>> {
    Ok(build_stores(u)?.0)
}

/// The store and its multipart API (parts uploaded and committed one by one,
/// which `lifeboat copy --resume` needs), both on one client.
///
/// # Errors
/// As [`build_store`].
pub fn build_stores(u: &ObjectUrl) -> BResult<(Arc<dyn ObjectStore>, Arc<dyn MultipartStore>)> {
    fn both<T: ObjectStore + MultipartStore>(
        t: T,
    ) -> (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>) {
        let a = Arc::new(t);
        (a.clone(), a)
    }
    let cfg = |e: object_store::Error| {
        BackendError::Config(format!("{}: cannot configure the client: {e}", u.display()))
    };
    // Fail in seconds, not minutes, when the store is unreachable: a few
    // retries with backoff, bounded in time.
    let retry = object_store::RetryConfig {
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(30),
        backoff: Default::default(),
    };
    let client = object_store::ClientOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(5))
        .with_timeout(std::time::Duration::from_secs(120));
    Ok(match u.scheme.as_str() {
        "s3" => {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_client_options(client)
                .with_retry(retry)
                .with_bucket_name(&u.bucket);
            let endpoint = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .unwrap_or_default();
            if endpoint.starts_with("http://")
                || std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true")
            {
                b = b.with_allow_http(true);
            }
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                b = b.with_region("us-east-1");
            }
            both(b.build().map_err(cfg)?)
        }
        "az" => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_client_options(client)
                .with_retry(retry)
                .with_container_name(&u.bucket);
            if std::env::var("AZURE_STORAGE_USE_EMULATOR").is_ok_and(|v| v == "true" || v == "1") {
                b = b.with_use_emulator(true).with_allow_http(true);
            }
            both(b.build().map_err(cfg)?)
        }
        "gs" => both(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_client_options(client)
                .with_retry(retry)
                .with_bucket_name(&u.bucket)
                .build()
                .map_err(cfg)?,
        ),
        s => return Err(BackendError::Config(format!("unknown scheme {s}"))),
    })
}

/// A shared multi-thread runtime for blocking on object-store futures from
/// synchronous code.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lifeboat-io")
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// A vault under a prefix of a bucket or container.
#[derive(Debug)]
pub struct ObjectBackend {
    url: ObjectUrl,
    store: Arc<dyn ObjectStore>,
}

impl ObjectBackend {
    /// # Errors
    /// See [`ObjectUrl::parse`] and [`build_store`].
    pub fn from_url(url: &str) -> BResult<Self> {
        let url = ObjectUrl::parse(url)?;
        let store = build_store(&url)?;
        Ok(ObjectBackend { url, store })
    }

    fn path(&self, key: &str) -> Path {
        if self.url.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.url.prefix))
        }
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> BackendError {
        match e {
            object_store::Error::NotFound { .. } => BackendError::NotFound {
                location: self.location(),
                key: key.into(),
            },
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => BackendError::AlreadyExists {
                location: self.location(),
                key: key.into(),
            },
            e => BackendError::Remote {
                location: self.location(),
                op,
                key: key.into(),
                message: e.to_string(),
            },
        }
    }
}

impl Backend for ObjectBackend {
    fn location(&self) -> String {
        self.url.display()
    }

    fn put(&self, key: &str, data: &[u8]) -> BResult<()> {
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        runtime()
            .block_on(self.store.put(&self.path(key), payload))
            .map(|_| ())
            .map_err(|e| self.err("put", key, e))
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> BResult<()> {
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        runtime()
            .block_on(self.store.put_opts(&self.path(key), payload, opts))
            .map(|_| ())
            .map_err(|e| self.err("put", key, e))
    }

    fn get(&self, key: &str) -> BResult<Vec<u8>> {
        runtime()
            .block_on(async { self.store.get(&self.path(key)).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| self.err("get", key, e))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Vec<u8>> {
        let want = range.end.saturating_sub(range.start);
        let b = runtime()
            .block_on(self.store.get_range(&self.path(key), range))
            .map_err(|e| self.err("get", key, e))?;
        // Stores clamp a range past the end instead of failing: a short read
        // means a truncated object.
        if b.len() as u64 != want {
            return Err(BackendError::Io {
                location: self.location(),
                op: "get",
                key: key.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "object is shorter than expected ({} of {want} bytes)",
                        b.len()
                    ),
                ),
            });
        }
        Ok(b.to_vec())
    }

    fn head(&self, key: &str) -> BResult<Option<u64>> {
        match runtime().block_on(self.store.head(&self.path(key))) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>> {
        let p = self.path(prefix.trim_end_matches('/'));
        let strip = if self.url.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.url.prefix)
        };
        let metas: Vec<_> = runtime()
            .block_on(self.store.list(Some(&p)).try_collect::<Vec<_>>())
            .map_err(|e| self.err("list", prefix, e))?;
        let mut out: Vec<_> = metas
            .into_iter()
            .filter_map(|m| {
                let k = m.location.as_ref().strip_prefix(&strip)?.to_string();
                k.starts_with(prefix).then_some(ObjectInfo {
                    key: k,
                    size: m.size,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> BResult<()> {
        match runtime().block_on(self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = ObjectUrl::parse("s3://bkt/some/prefix/").unwrap();
        assert_eq!(
            (u.scheme.as_str(), u.bucket.as_str(), u.prefix.as_str()),
            ("s3", "bkt", "some/prefix")
        );
        assert_eq!(ObjectUrl::parse("azure://c").unwrap().display(), "az://c");
        assert_eq!(ObjectUrl::parse("gs://b/x").unwrap().display(), "gs://b/x");
        assert!(ObjectUrl::parse("ftp://x/y").is_err());
        assert!(ObjectUrl::parse("s3:///y").is_err());
    }

    #[test]
    fn gcs_is_configured_from_the_environment() {
        // No GCS emulator runs here: check that a service-account key in the
        // environment is picked up and that the client builds for a bucket.
        let u = ObjectUrl::parse("gs://lifeboat-test/vault").unwrap();
        let key = r#"{"private_key":"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC\n-----END PRIVATE KEY-----\n","client_email":"lb@example.iam.gserviceaccount.com","private_key_id":"x"}"#;
        let b = object_store::gcp::GoogleCloudStorageBuilder::new()
            .with_bucket_name(&u.bucket)
            .with_service_account_key(key);
        assert_eq!(
            b.get_config_value(&object_store::gcp::GoogleConfigKey::Bucket)
                .as_deref(),
            Some("lifeboat-test")
        );
        let bad = object_store::gcp::GoogleCloudStorageBuilder::new().build();
        assert!(bad.is_err(), "a GCS client without a bucket must not build");
    }
}
