//! The client database behind a mutex, used from async code through `spawn_blocking` so that
//! SQLite never blocks the RPC thread.

use crate::error::Result;
use capsync_persistence::client::ClientDb;
use capsync_persistence::StorageError;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Db {
    inner: Arc<Mutex<ClientDb>>,
}

impl Db {
    pub fn new(db: ClientDb) -> Db {
        Db { inner: Arc::new(Mutex::new(db)) }
    }

    /// Runs `work` on the calling thread (for the synchronous API).
    pub fn with<T>(&self, work: impl FnOnce(&ClientDb) -> Result<T, StorageError>) -> Result<T> {
        let db = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(work(&db)?)
    }

    /// Runs `work` on a blocking-pool thread.
    pub async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ClientDb) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let db = inner.lock().unwrap_or_else(|p| p.into_inner());
            work(&db)
        })
        .await;
        match joined {
            Ok(result) => Ok(result?),
            Err(_) => Err(StorageError::Stopped.into()),
        }
    }
}
